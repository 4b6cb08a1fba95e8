//! The embedded SQLite ledger: WAL mode, one writer, per-call rows plus per-day roll-ups.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use std::sync::{Arc, Mutex};

use super::{Background, LedgerRead, OTHER_MODEL, REJECTED_MODEL, Record, Store};

/// Schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 4;

const SCHEMA_V1: &str = r"
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    key_name TEXT,
    key_fp TEXT,
    route TEXT,
    project_name TEXT,
    project_id TEXT,
    tags TEXT NOT NULL DEFAULT '{}',
    api TEXT,
    model TEXT,
    stream INTEGER NOT NULL DEFAULT 0,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    error_code TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    usage_source TEXT NOT NULL,
    cost_pico INTEGER,
    duration_ms REAL NOT NULL,
    ttfb_ms REAL,
    upstream_response_id TEXT
);
CREATE INDEX IF NOT EXISTS calls_ts ON calls (ts_ms);
CREATE INDEX IF NOT EXISTS calls_response ON calls (upstream_response_id)
    WHERE upstream_response_id IS NOT NULL;
-- Dropped by version 2 (`key_last_used` answers the one query it served).
CREATE INDEX IF NOT EXISTS calls_key_ts ON calls (key_fp, ts_ms);

-- One row per UTC day and combination of dimensions: reports and budgets read this, so they
-- stay fast however many calls there are, and it survives deleting old raw rows.
CREATE TABLE IF NOT EXISTS daily (
    day TEXT NOT NULL,
    key_name TEXT NOT NULL,
    route TEXT NOT NULL,
    project_name TEXT NOT NULL,
    project_id TEXT NOT NULL,
    tags TEXT NOT NULL,
    api TEXT NOT NULL,
    model TEXT NOT NULL,
    outcome TEXT NOT NULL,
    requests INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost_pico INTEGER NOT NULL,
    unpriced_requests INTEGER NOT NULL,
    PRIMARY KEY (day, key_name, route, project_name, project_id, tags, api, model, outcome)
) WITHOUT ROWID;

-- Background responses created but not yet seen finished; metered once, when they are.
CREATE TABLE IF NOT EXISTS pending_background (
    response_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    model TEXT,
    ts_ms INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Version 2: when each key was last used, one row per key, kept by the writer once per batch,
/// in place of an index on `calls (key_fp, ts_ms)` that every call's row had to be inserted
/// into for the sake of `mantlegate keys list` alone. Filled from that index, then drops it.
const SCHEMA_V2: &str = r"
BEGIN;
CREATE TABLE IF NOT EXISTS key_last_used (
    key_fp TEXT PRIMARY KEY,
    ts_ms INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR REPLACE INTO key_last_used (key_fp, ts_ms)
    SELECT key_fp, MAX(ts_ms) FROM calls WHERE key_fp IS NOT NULL GROUP BY key_fp;
DROP INDEX IF EXISTS calls_key_ts;
PRAGMA user_version = 2;
COMMIT;
";

/// Version 3: each call's identity is mantlegate's own call id, unique; the request id (the
/// upstream's, or anything a client had it echo) is a plain column. Rows written before get
/// their [`legacy_call_id`](super::legacy_call_id) in [`migrate_v3`] between these two steps.
const SCHEMA_V3_COLUMN: &str = "ALTER TABLE calls ADD COLUMN call_id TEXT";
const SCHEMA_V3_INDEX: &str = r"
CREATE UNIQUE INDEX IF NOT EXISTS calls_call_id ON calls (call_id);
PRAGMA user_version = 3;
";

/// Version 4: budget alerts waiting for their webhook ([`SqliteOutbox`]), so that a restart
/// resumes them.
const SCHEMA_V4: &str = r"
BEGIN;
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    lease_owner TEXT,
    lease_until_ms INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS webhook_outbox_next ON webhook_outbox (next_attempt_ms);
PRAGMA user_version = 4;
COMMIT;
";

const UPSERT_LAST_USED: &str = "INSERT INTO key_last_used (key_fp, ts_ms) VALUES (?1, ?2)
    ON CONFLICT (key_fp) DO UPDATE SET ts_ms = MAX(ts_ms, excluded.ts_ms)";

const INSERT_CALLS: &str = "INSERT INTO calls (ts_ms, request_id, key_name, route, project_name,
    project_id, tags, api, model, stream, status, outcome, error_code, input_tokens,
    cached_input_tokens, output_tokens, reasoning_tokens, usage_source, cost_pico, duration_ms,
    ttfb_ms, upstream_response_id, key_fp, call_id) VALUES ";

/// A call already in the ledger (a retried batch, an import run twice) is skipped, and only
/// that: other constraint failures still fail the batch.
const ON_CONFLICT: &str = " ON CONFLICT (call_id) DO NOTHING";

/// Values a call row binds ([`Binder::row`]).
const CALL_COLUMNS: usize = 24;

/// Rows per multi-row insert. SQLite does a statement's fixed work (opening the table and its
/// indexes, ending the statement) once per statement, not per row, so the writer inserts a
/// batch 16 rows at a time and the rest one by one.
const ROWS_PER_INSERT: usize = 16;

static INSERT_MANY: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| insert_calls_sql(ROWS_PER_INSERT));
static INSERT_ONE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| insert_calls_sql(1));

/// `INSERT INTO calls ... VALUES (?, ...), ...` with `rows` rows of placeholders.
fn insert_calls_sql(rows: usize) -> String {
    let row = format!("({})", vec!["?"; CALL_COLUMNS].join(", "));
    format!("{INSERT_CALLS}{}{ON_CONFLICT}", vec![row; rows].join(", "))
}

/// What one parameter of a prepared insert was last bound to, in this batch.
#[derive(Default)]
enum Bound {
    /// Not bound yet in this batch, or bound to a value that is not remembered.
    #[default]
    Unknown,
    Null,
    Int(i64),
    Static(&'static str),
    Shared(Arc<str>),
    Text(String),
}

/// Binds call rows to a prepared insert, leaving alone a parameter that already holds the value.
///
/// SQLite keeps a statement's parameters from one execution to the next (`sqlite3_reset`
/// leaves them bound; rusqlite clears them only when the statement goes back to its cache),
/// and most of a call row repeats from one row to the next: the key, project, tags, model,
/// outcome, status. Binding text is the expensive part: rusqlite always binds it as
/// `SQLITE_TRANSIENT`, so SQLite allocates and copies each value. Binding every value of a row was
/// a large share of the writer's instructions per row; skipping the unchanged ones leaves the
/// ones that vary (time, call and request ids, durations, counts).
///
/// A `Binder` belongs to one statement for one batch: a new batch (or a retried one) starts a
/// new one, which binds everything once.
struct Binder {
    last: Vec<Bound>,
}

impl Binder {
    fn new(params: usize) -> Self {
        Self {
            last: std::iter::repeat_with(Bound::default)
                .take(params)
                .collect(),
        }
    }

    /// Binds `r` as the row whose first value is parameter `first` (1-based).
    fn row(
        &mut self,
        stmt: &mut rusqlite::CachedStatement<'_>,
        first: usize,
        r: &Record,
    ) -> rusqlite::Result<()> {
        let u = &r.usage;
        let mut at = first;
        let mut next = || {
            at += 1;
            at - 1
        };
        self.int(stmt, next(), Some(r.ts_ms))?;
        stmt.raw_bind_parameter(next(), &r.request_id)?;
        self.shared(stmt, next(), r.key.as_ref())?;
        self.shared(stmt, next(), r.route.as_ref())?;
        self.shared(stmt, next(), r.project.as_ref())?;
        self.shared(stmt, next(), r.project_id.as_ref())?;
        match &r.tags {
            Some(tags) => self.shared(stmt, next(), Some(tags))?,
            None => self.fixed(stmt, next(), Some("{}"))?,
        }
        self.fixed(stmt, next(), r.api)?;
        self.text(stmt, next(), r.model.as_deref())?;
        self.int(stmt, next(), Some(i64::from(r.stream)))?;
        self.int(stmt, next(), Some(i64::from(r.status)))?;
        self.fixed(stmt, next(), Some(r.outcome))?;
        self.fixed(stmt, next(), r.error_code)?;
        self.int(stmt, next(), Some(to_i64(u.input)))?;
        self.int(stmt, next(), Some(to_i64(u.cached_input)))?;
        self.int(stmt, next(), Some(to_i64(u.output)))?;
        self.int(stmt, next(), Some(to_i64(u.reasoning)))?;
        self.fixed(stmt, next(), Some(r.usage_source.as_str()))?;
        self.int(stmt, next(), r.cost_pico)?;
        stmt.raw_bind_parameter(next(), r.duration_ms)?;
        stmt.raw_bind_parameter(next(), r.ttfb_ms)?;
        stmt.raw_bind_parameter(next(), &r.upstream_response_id)?;
        self.shared(stmt, next(), r.key_fp.as_ref())?;
        stmt.raw_bind_parameter(next(), &r.call_id)?;
        debug_assert_eq!(at - first, CALL_COLUMNS);
        Ok(())
    }

    fn int(
        &mut self,
        stmt: &mut rusqlite::CachedStatement<'_>,
        at: usize,
        value: Option<i64>,
    ) -> rusqlite::Result<()> {
        self.put(
            stmt,
            at,
            value,
            |v, last| matches!(last, Bound::Int(l) if l == v),
            Bound::Int,
        )
    }

    fn fixed(
        &mut self,
        stmt: &mut rusqlite::CachedStatement<'_>,
        at: usize,
        value: Option<&'static str>,
    ) -> rusqlite::Result<()> {
        let holds = |v: &&str, last: &Bound| matches!(last, Bound::Static(l) if l == v);
        self.put(stmt, at, value, holds, Bound::Static)
    }

    fn shared(
        &mut self,
        stmt: &mut rusqlite::CachedStatement<'_>,
        at: usize,
        value: Option<&Arc<str>>,
    ) -> rusqlite::Result<()> {
        let holds = |v: &&Arc<str>, last: &Bound| matches!(last, Bound::Shared(l) if Arc::ptr_eq(v, l) || ***v == **l);
        self.put(stmt, at, value, holds, |v| Bound::Shared(v.clone()))
    }

    fn text(
        &mut self,
        stmt: &mut rusqlite::CachedStatement<'_>,
        at: usize,
        value: Option<&str>,
    ) -> rusqlite::Result<()> {
        let holds = |v: &&str, last: &Bound| matches!(last, Bound::Text(l) if l == v);
        self.put(stmt, at, value, holds, |v| Bound::Text(v.to_owned()))
    }

    /// Binds `value` to parameter `at` unless the parameter already holds it: `holds` tells
    /// whether what was last bound there equals the value, `remember` what to keep of it.
    fn put<T: rusqlite::ToSql>(
        &mut self,
        stmt: &mut rusqlite::CachedStatement<'_>,
        at: usize,
        value: Option<T>,
        holds: impl FnOnce(&T, &Bound) -> bool,
        remember: impl FnOnce(T) -> Bound,
    ) -> rusqlite::Result<()> {
        let slot = &mut self.last[at - 1];
        let same = match &value {
            None => matches!(slot, Bound::Null),
            Some(v) => holds(v, slot),
        };
        if !same {
            stmt.raw_bind_parameter(at, &value)?;
            *slot = value.map_or(Bound::Null, remember);
        }
        Ok(())
    }
}

const UPSERT_DAILY: &str = "INSERT INTO daily (day, key_name, route, project_name, project_id,
    tags, api, model, outcome, requests, input_tokens, cached_input_tokens, output_tokens,
    reasoning_tokens, cost_pico, unpriced_requests)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?16, ?10, ?11, ?12, ?13, ?14, ?15)
    ON CONFLICT (day, key_name, route, project_name, project_id, tags, api, model, outcome)
    DO UPDATE SET requests = requests + excluded.requests,
        input_tokens = input_tokens + excluded.input_tokens,
        cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,
        cost_pico = cost_pico + excluded.cost_pico,
        unpriced_requests = unpriced_requests + excluded.unpriced_requests";

/// Opens (creating if needed) a ledger database and brings its schema up to date.
///
/// # Errors
/// When the file cannot be opened, or holds a newer schema than this build knows.
pub fn open(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(path)?;
    configure(&conn)?;
    migrate(&conn)?;
    Ok(conn)
}

/// Opens an existing ledger read-only (reports, lookups).
///
/// # Errors
/// When the file cannot be opened or has no ledger schema.
pub fn open_read_only(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    anyhow::ensure!(
        version >= 1,
        "{} is not a mantlegate ledger (no schema)",
        path.display()
    );
    Ok(conn)
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // WAL: readers never block the writer. synchronous=NORMAL: a commit is in the WAL (the OS
    // has it) when the call returns, so it survives the process being killed; only a power
    // loss can take the last commits, and never corrupts the file.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(())
}

fn migrate(conn: &Connection) -> anyhow::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    anyhow::ensure!(
        version <= SCHEMA_VERSION,
        "the ledger has schema version {version}, newer than this mantlegate knows ({SCHEMA_VERSION}): upgrade mantlegate"
    );
    if version < 1 {
        conn.execute_batch(SCHEMA_V1)?;
        conn.pragma_update(None, "user_version", 1)?;
    }
    if version < 2 {
        conn.execute_batch(SCHEMA_V2)?;
    }
    if version < 3 {
        migrate_v3(conn)?;
    }
    if version < 4 {
        conn.execute_batch(SCHEMA_V4)?;
    }
    Ok(())
}

/// Schema version 3, in one transaction: the `call_id` column, filled for the rows already
/// there with their [`legacy_call_id`](super::legacy_call_id) (counting calls that share a
/// request id and time in the order they were written, as an export lists them), then made
/// unique.
fn migrate_v3(conn: &Connection) -> anyhow::Result<()> {
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch(SCHEMA_V3_COLUMN)?;
    {
        // The window is computed (sorted) before the first row comes back, and the update
        // changes no column the query reads: updating while reading is safe here.
        let mut read = tx.prepare(
            "SELECT id, request_id, ts_ms,
                row_number() OVER (PARTITION BY request_id, ts_ms ORDER BY id) - 1
             FROM calls",
        )?;
        let mut write = tx.prepare("UPDATE calls SET call_id = ?1 WHERE id = ?2")?;
        let mut rows = read.query([])?;
        let mut n = 0u64;
        while let Some(row) = rows.next()? {
            let (id, request_id, ts_ms, nth): (i64, String, i64, i64) =
                (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
            let call_id =
                super::legacy_call_id(&request_id, ts_ms, u64::try_from(nth).unwrap_or(0));
            write.execute(params![call_id, id])?;
            n += 1;
        }
        if n > 0 {
            tracing::info!(
                calls = n,
                "sqlite ledger: call ids given to the calls recorded before them"
            );
        }
    }
    tx.execute_batch(SCHEMA_V3_INDEX)?;
    tx.commit()?;
    Ok(())
}

/// Milliseconds in a UTC day (Unix time has no leap seconds).
const MS_PER_DAY: i64 = 86_400_000;

/// A roll-up row's identity, borrowed from the batch's records (no copies per record); the
/// day as its number since the epoch, turned into text once per row.
#[derive(PartialEq, Eq)]
struct DailyKey<'a> {
    day: i64,
    key: &'a str,
    route: &'a str,
    project: &'a str,
    project_id: &'a str,
    tags: &'a str,
    api: &'static str,
    model: &'a str,
    outcome: &'static str,
}

/// Hashes a subset of the fields (equal keys still hash alike): the tags' JSON, the project's
/// name and the route follow from the project and key, and hashing the tags' hundred-odd bytes
/// for every record was most of the roll-up's cost.
impl std::hash::Hash for DailyKey<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.day.hash(state);
        self.key.hash(state);
        self.project_id.hash(state);
        self.api.hash(state);
        self.model.hash(state);
        self.outcome.hash(state);
    }
}

/// What a batch adds to a roll-up row.
#[derive(Default)]
struct DailyDelta {
    requests: i64,
    input: i64,
    cached: i64,
    output: i64,
    reasoning: i64,
    cost: i64,
    unpriced: i64,
}

/// Inserts the batch's rows into `calls`; returns which records were skipped as already there,
/// or `None` when none was.
fn insert_calls(
    tx: &rusqlite::Transaction<'_>,
    records: &[Record],
) -> rusqlite::Result<Option<Skipped>> {
    // Which records were new: `None` while all were (the usual case, known from each
    // insert's count of rows added without looking further).
    let mut skipped: Option<Skipped> = None;
    let mut chunks = records.chunks_exact(ROWS_PER_INSERT);
    {
        let mut insert = tx.prepare_cached(&INSERT_MANY)?;
        let mut binder = Binder::new(ROWS_PER_INSERT * CALL_COLUMNS);
        for (c, chunk) in (&mut chunks).enumerate() {
            for (i, r) in chunk.iter().enumerate() {
                binder.row(&mut insert, 1 + i * CALL_COLUMNS, r)?;
            }
            let added = insert.raw_execute()?;
            if added < chunk.len() {
                skipped
                    .get_or_insert_with(|| Skipped::new(records.len()))
                    .find(tx, c * ROWS_PER_INSERT, chunk, added)?;
            }
        }
    }
    let mut insert = tx.prepare_cached(&INSERT_ONE)?;
    let mut binder = Binder::new(CALL_COLUMNS);
    let rest = records.len() - chunks.remainder().len();
    for (i, r) in chunks.remainder().iter().enumerate() {
        binder.row(&mut insert, 1, r)?;
        if insert.raw_execute()? == 0 {
            skipped
                .get_or_insert_with(|| Skipped::new(records.len()))
                .old[rest + i] = true;
        }
    }
    Ok(skipped)
}

/// The records of a batch that were already in the ledger (same call id), and so skipped.
struct Skipped {
    /// By position in the batch.
    old: Vec<bool>,
    /// Rows of this batch found for a record: a call id twice in a batch is new only once.
    claimed: std::collections::HashSet<i64>,
}

impl Skipped {
    fn new(records: usize) -> Self {
        Self {
            old: vec![false; records],
            claimed: std::collections::HashSet::new(),
        }
    }

    /// Marks which records of `chunk` (starting at `first` in the batch) the insert that just
    /// ran skipped; it added `added` rows. Those rows have the `added` highest ids, one after
    /// another (a new row's id is one past the largest, and one writer inserts at a time): a
    /// record whose call id's row is not among them, or was already claimed by an earlier copy
    /// in the chunk, was skipped.
    fn find(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        first: usize,
        chunk: &[Record],
        added: usize,
    ) -> rusqlite::Result<()> {
        let top = tx.last_insert_rowid();
        let low = top - i64::try_from(added).unwrap_or(i64::MAX);
        let mut find = tx.prepare_cached("SELECT id FROM calls WHERE call_id = ?1")?;
        for (i, r) in chunk.iter().enumerate() {
            let id: Option<i64> = if added == 0 {
                None
            } else {
                find.query_row([&r.call_id], |row| row.get(0)).optional()?
            };
            let new = id.is_some_and(|id| id > low && id <= top && self.claimed.insert(id));
            self.old[first + i] = !new;
        }
        Ok(())
    }
}

/// The SQLite [`Store`].
pub struct SqliteStore {
    conn: Connection,
    /// Distinct models a key may add to a day's roll-up (`[ledger] max_models_per_day`).
    max_models: usize,
}

impl SqliteStore {
    /// Opens the ledger at `path` for writing.
    ///
    /// # Errors
    /// See [`open`].
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            conn: open(path)?,
            max_models: crate::config::DEFAULT_MAX_MODELS_PER_DAY,
        })
    }

    /// Sets how many distinct models a key may add to a day's roll-up (the rest roll up under
    /// `(other)`).
    #[must_use]
    pub fn with_max_models_per_day(mut self, max: usize) -> Self {
        self.max_models = max;
        self
    }
}

/// The models a key already has in a day's roll-up, placeholders aside: loaded once per batch
/// and `(day, key)`, then kept up to date as the batch adds models.
type DayModels<'a> =
    std::collections::HashMap<(i64, &'a str), HashSet<String>, foldhash::fast::RandomState>;

/// The model `r` is rolled up under: [`Record::rollup_model`], or `(other)` when its key
/// already has `max` other models that day.
fn capped_model<'a>(
    tx: &rusqlite::Transaction<'_>,
    seen: &mut DayModels<'a>,
    r: &'a Record,
    day: i64,
    max: usize,
) -> rusqlite::Result<&'a str> {
    let model = r.rollup_model();
    if model == REJECTED_MODEL || model == OTHER_MODEL {
        return Ok(model);
    }
    let key = r.key.as_deref().unwrap_or("");
    let models = match seen.entry((day, key)) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            let mut stmt = tx.prepare_cached(
                "SELECT DISTINCT model FROM daily WHERE day = ?1 AND key_name = ?2
                 AND model NOT IN ('(rejected)', '(other)')",
            )?;
            let rows = stmt.query_map(params![utc_day(day * MS_PER_DAY), key], |row| {
                row.get::<_, String>(0)
            })?;
            e.insert(rows.collect::<rusqlite::Result<HashSet<String>>>()?)
        }
    };
    if models.contains(model) {
        Ok(model)
    } else if models.len() < max {
        models.insert(model.to_owned());
        Ok(model)
    } else {
        Ok(OTHER_MODEL)
    }
}

/// `YYYY-MM-DD` (UTC) of a Unix-milliseconds time.
#[must_use]
pub fn utc_day(ts_ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ts_ms).map_or_else(
        |_| "1970-01-01".to_owned(),
        |t| {
            t.to_zoned_datetime(jiff::tz::TimeZone::UTC)
                .date()
                .to_string()
        },
    )
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Store for SqliteStore {
    fn write_batch(&mut self, records: &[Record]) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        write_in(&tx, records, self.max_models)?;
        tx.commit()?;
        Ok(())
    }

    fn write_all(
        &mut self,
        next: &mut dyn FnMut() -> anyhow::Result<Option<Vec<Record>>>,
    ) -> anyhow::Result<()> {
        // Dropped without a commit at the first error: rolled back, nothing written.
        let tx = self.conn.transaction()?;
        while let Some(batch) = next()? {
            write_in(&tx, &batch, self.max_models)?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// Writes `records` with their roll-ups inside `tx` (which the caller commits).
/// Writes `records` in `tx`; a key's models in a day's roll-up beyond `max_models` go under
/// `(other)`.
fn write_in(
    tx: &rusqlite::Transaction<'_>,
    records: &[Record],
    max_models: usize,
) -> anyhow::Result<()> {
    let skipped = insert_calls(tx, records)?;
    let mut daily = tx.prepare_cached(UPSERT_DAILY)?;
    let mut pending = tx.prepare_cached(
        "INSERT OR REPLACE INTO pending_background (response_id, project_id, model, ts_ms) VALUES (?1, ?2, ?3, ?4)",
    )?;
    let mut settle = tx.prepare_cached("DELETE FROM pending_background WHERE response_id = ?1")?;
    let mut last_used = tx.prepare_cached(UPSERT_LAST_USED)?;
    let mut latest: std::collections::HashMap<&str, i64, foldhash::fast::RandomState> =
        std::collections::HashMap::default();
    // The day's roll-up rows a batch touches are few: add the batch up first, then
    // one upsert per row rather than one per record.
    let mut rollup: std::collections::HashMap<DailyKey, DailyDelta, foldhash::fast::RandomState> =
        std::collections::HashMap::default();
    let mut day_models = DayModels::default();
    for (i, r) in records.iter().enumerate() {
        // A call already recorded counts nowhere again.
        if skipped.as_ref().is_some_and(|s| s.old[i]) {
            continue;
        }
        let u = &r.usage;
        let day = r.ts_ms.div_euclid(MS_PER_DAY);
        let model = capped_model(tx, &mut day_models, r, day, max_models)?;
        let d = rollup
            .entry(DailyKey {
                day,
                key: r.key.as_deref().unwrap_or(""),
                route: r.route.as_deref().unwrap_or(""),
                project: r.project.as_deref().unwrap_or(""),
                project_id: r.project_id.as_deref().unwrap_or(""),
                tags: r.tags.as_deref().unwrap_or("{}"),
                api: r.api.unwrap_or(""),
                model,
                outcome: r.outcome,
            })
            .or_default();
        d.requests += 1;
        d.input += to_i64(u.input);
        d.cached += to_i64(u.cached_input);
        d.output += to_i64(u.output);
        d.reasoning += to_i64(u.reasoning);
        d.cost = d.cost.saturating_add(r.cost_pico.unwrap_or(0));
        d.unpriced += i64::from(r.cost_pico.is_none());
        if let Some(fp) = r.key_fp.as_deref() {
            let ts = latest.entry(fp).or_insert(r.ts_ms);
            *ts = (*ts).max(r.ts_ms);
        }
        match (&r.background, &r.upstream_response_id) {
            (Some(Background::Pending), Some(id)) => {
                pending.execute(params![
                    id,
                    r.project_id.as_deref().unwrap_or(""),
                    r.model,
                    r.ts_ms
                ])?;
            }
            (Some(Background::Settled), Some(id)) => {
                settle.execute(params![id])?;
            }
            _ => {}
        }
    }
    for (fp, ts) in latest {
        last_used.execute(params![fp, ts])?;
    }
    for (k, d) in rollup {
        daily.execute(params![
            utc_day(k.day * MS_PER_DAY),
            k.key,
            k.route,
            k.project,
            k.project_id,
            k.tags,
            k.api,
            k.model,
            k.outcome,
            d.input,
            d.cached,
            d.output,
            d.reasoning,
            d.cost,
            d.unpriced,
            d.requests
        ])?;
    }
    Ok(())
}

/// The SQLite [`LedgerRead`]: one read-only connection behind a mutex (reads are short).
pub struct Reader {
    conn: Mutex<Connection>,
}

impl Reader {
    /// Wraps a read connection.
    #[must_use]
    pub fn new(conn: Connection) -> Self {
        Self {
            conn: Mutex::new(conn),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("ledger reader poisoned"))?;
        f(&conn)
    }
}

impl LedgerRead for Reader {
    fn project_of_response(&self, response_id: &str) -> anyhow::Result<Option<String>> {
        self.with(|c| {
            Ok(c.prepare_cached(
                "SELECT project_id FROM calls WHERE upstream_response_id = ?1
                 AND project_id IS NOT NULL ORDER BY id LIMIT 1",
            )?
            .query_row([response_id], |r| r.get(0))
            .optional()?)
        })
    }

    fn pending_background(&self) -> anyhow::Result<Vec<(String, String, Option<String>)>> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT response_id, project_id, model FROM pending_background")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn spend_between(
        &self,
        start_ms: i64,
        end_ms: i64,
    ) -> anyhow::Result<Vec<(String, String, i64)>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT COALESCE(project_name, ''), tags, SUM(cost_pico) FROM calls
                 WHERE ts_ms >= ?1 AND ts_ms < ?2 AND cost_pico IS NOT NULL
                 GROUP BY project_name, tags",
            )?;
            let rows = stmt.query_map([start_ms, end_ms], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn last_used(&self) -> anyhow::Result<std::collections::HashMap<String, i64>> {
        self.with(|c| {
            // A ledger no `serve` of this version has opened yet is still at version 1.
            let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            let mut stmt = c.prepare(if version >= 2 {
                "SELECT key_fp, ts_ms FROM key_last_used"
            } else {
                "SELECT key_fp, MAX(ts_ms) FROM calls WHERE key_fp IS NOT NULL GROUP BY key_fp"
            })?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn daily(&self, period: &super::read::Period) -> anyhow::Result<Vec<super::read::DailyRow>> {
        self.with(|c| super::read::load_daily(c, period))
    }

    fn count(&self) -> anyhow::Result<i64> {
        self.with(|c| Ok(c.query_row("SELECT COUNT(*) FROM calls", [], |r| r.get(0))?))
    }
}

/// The SQLite [`Outbox`](super::outbox::Outbox): a connection of its own to the ledger file
/// (alerts are rare; the writer thread keeps its own), behind a mutex.
pub struct SqliteOutbox {
    conn: Mutex<Connection>,
}

impl SqliteOutbox {
    /// Opens the outbox of the ledger at `path` (creating and migrating it as [`open`] does).
    ///
    /// # Errors
    /// See [`open`].
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            conn: Mutex::new(open(path)?),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("ledger outbox poisoned"))?;
        f(&mut conn)
    }
}

impl super::outbox::Outbox for SqliteOutbox {
    fn add(&self, entries: &[super::outbox::Entry]) -> anyhow::Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO webhook_outbox (id, created_ms, body, next_attempt_ms)
                     VALUES (?1, ?2, ?3, ?2) ON CONFLICT (id) DO NOTHING",
                )?;
                for e in entries {
                    insert.execute(params![e.id, e.created_ms, e.body])?;
                }
            }
            tx.commit()?;
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
        self.with(|c| {
            // IMMEDIATE: the write lock from the start, so the check and the claim are one step.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let busy: Option<i64> = tx.query_row(
                "SELECT MAX(lease_until_ms) FROM webhook_outbox WHERE lease_until_ms > ?1",
                [now_ms],
                |r| r.get(0),
            )?;
            if let Some(until_ms) = busy {
                return Ok(Claim::Busy { until_ms });
            }
            let due = tx
                .query_row(
                    "SELECT id, created_ms, body, attempts FROM webhook_outbox
                     WHERE next_attempt_ms <= ?1 ORDER BY next_attempt_ms, created_ms LIMIT 1",
                    [now_ms],
                    |r| {
                        Ok((
                            Entry {
                                id: r.get(0)?,
                                created_ms: r.get(1)?,
                                body: r.get(2)?,
                            },
                            r.get::<_, u32>(3)?,
                        ))
                    },
                )
                .optional()?;
            let claim = match due {
                Some((entry, attempts)) => {
                    tx.execute(
                        "UPDATE webhook_outbox SET attempts = attempts + 1, lease_owner = ?2,
                         lease_until_ms = ?3 WHERE id = ?1",
                        params![entry.id, owner, lease_until_ms],
                    )?;
                    Claim::Row {
                        entry,
                        attempt: attempts.saturating_add(1),
                    }
                }
                None => Claim::Idle {
                    next_ms: tx.query_row(
                        "SELECT MIN(next_attempt_ms) FROM webhook_outbox",
                        [],
                        |r| r.get(0),
                    )?,
                },
            };
            tx.commit()?;
            Ok(claim)
        })
    }

    fn delivered(&self, id: &str) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM webhook_outbox WHERE id = ?1", [id])?;
            Ok(())
        })
    }

    fn failed(&self, id: &str, owner: &str, next_ms: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE webhook_outbox SET next_attempt_ms = ?3, lease_owner = NULL,
                 lease_until_ms = 0 WHERE id = ?1 AND lease_owner = ?2",
                params![id, owner, next_ms],
            )?;
            Ok(())
        })
    }

    fn expire(
        &self,
        created_before_ms: i64,
        now_ms: i64,
    ) -> anyhow::Result<Vec<super::outbox::Entry>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "DELETE FROM webhook_outbox WHERE created_ms < ?1 AND lease_until_ms <= ?2
                 RETURNING id, created_ms, body",
            )?;
            let rows = stmt.query_map([created_before_ms, now_ms], |r| {
                Ok(super::outbox::Entry {
                    id: r.get(0)?,
                    created_ms: r.get(1)?,
                    body: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn release_stale(&self) -> anyhow::Result<()> {
        // One process owns a SQLite ledger: a lease found at start is a previous process's.
        self.with(|c| {
            c.execute(
                "UPDATE webhook_outbox SET lease_owner = NULL, lease_until_ms = 0
                 WHERE lease_owner IS NOT NULL",
                [],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::{Usage, UsageSource};

    fn record(ts_ms: i64, tags: &str, model: &str) -> Record {
        Record {
            tags: Some(Arc::from(tags)),
            model: Some(model.to_owned()),
            cost_pico: Some(100),
            ..crate::ledger::sample_record(ts_ms)
        }
    }

    /// Every row a query returns, each as a tuple of its columns.
    fn rows_of<T>(stmt: &mut rusqlite::Statement<'_>) -> Vec<T>
    where
        T: for<'a> TryFrom<&'a rusqlite::Row<'a>, Error = rusqlite::Error>,
    {
        stmt.query_map([], |r| T::try_from(r))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    #[test]
    fn every_row_of_a_multi_row_insert_holds_its_own_record() {
        type Row = (
            i64,
            String,
            Option<String>,
            Option<String>,
            Option<i64>,
            Option<f64>,
            Option<String>,
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("l.db");
        let mut store = SqliteStore::open(&path).expect("open");
        // Two full statements and a remainder, each record different in every varied field.
        let n = 2 * ROWS_PER_INSERT + 5;
        let batch: Vec<Record> = (0..n)
            .map(|i| {
                let i64n = i64::try_from(i).expect("small");
                Record {
                    request_id: format!("mg_{i}"),
                    model: Some(format!("model-{i}")),
                    key_fp: (i % 3 != 0).then(|| Arc::from(format!("fp{i}").as_str())),
                    cost_pico: (i % 4 != 0).then_some(i64n * 7),
                    ttfb_ms: (i % 2 == 0)
                        .then_some(0.5 + f64::from(u32::try_from(i).expect("small"))),
                    upstream_response_id: (i % 5 == 0).then(|| format!("resp_{i}")),
                    ..crate::ledger::sample_record(1_793_491_200_000 + i64n)
                }
            })
            .collect();
        store.write_batch(&batch).expect("write");
        let conn = open_read_only(&path).expect("read");
        let mut stmt = conn
            .prepare("SELECT ts_ms, request_id, model, key_fp, cost_pico, ttfb_ms, upstream_response_id FROM calls ORDER BY id")
            .expect("prepare");
        let rows: Vec<Row> = rows_of(&mut stmt);
        let expected: Vec<Row> = batch
            .iter()
            .map(|r| {
                (
                    r.ts_ms,
                    r.request_id.clone(),
                    r.model.clone(),
                    r.key_fp.as_deref().map(str::to_owned),
                    r.cost_pico,
                    r.ttfb_ms,
                    r.upstream_response_id.clone(),
                )
            })
            .collect();
        assert_eq!(rows, expected);
    }

    /// Every column of every row, as SQLite holds it.
    fn all_columns(conn: &Connection) -> Vec<Vec<rusqlite::types::Value>> {
        let mut stmt = conn
            .prepare(
                "SELECT ts_ms, request_id, key_name, route, project_name, project_id, tags, api,
                 model, stream, status, outcome, error_code, input_tokens, cached_input_tokens,
                 output_tokens, reasoning_tokens, usage_source, cost_pico, duration_ms, ttfb_ms,
                 upstream_response_id, key_fp, call_id FROM calls ORDER BY id",
            )
            .expect("prepare");
        stmt.query_map([], |row| {
            (0..CALL_COLUMNS)
                .map(|i| row.get::<_, rusqlite::types::Value>(i))
                .collect()
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
    }

    /// The row a record should leave, written out column by column.
    fn expected_row(r: &Record) -> Vec<rusqlite::types::Value> {
        use rusqlite::types::Value;
        let text = |v: Option<&str>| v.map_or(Value::Null, |v| Value::Text(v.to_owned()));
        let int = |v: u64| Value::Integer(i64::try_from(v).expect("small"));
        vec![
            Value::Integer(r.ts_ms),
            Value::Text(r.request_id.clone()),
            text(r.key.as_deref()),
            text(r.route.as_deref()),
            text(r.project.as_deref()),
            text(r.project_id.as_deref()),
            Value::Text(r.tags.as_deref().unwrap_or("{}").to_owned()),
            text(r.api),
            text(r.model.as_deref()),
            Value::Integer(i64::from(r.stream)),
            Value::Integer(i64::from(r.status)),
            Value::Text(r.outcome.to_owned()),
            text(r.error_code),
            int(r.usage.input),
            int(r.usage.cached_input),
            int(r.usage.output),
            int(r.usage.reasoning),
            Value::Text(r.usage_source.as_str().to_owned()),
            r.cost_pico.map_or(Value::Null, Value::Integer),
            Value::Real(r.duration_ms),
            r.ttfb_ms.map_or(Value::Null, Value::Real),
            text(r.upstream_response_id.as_deref()),
            text(r.key_fp.as_deref()),
            Value::Text(r.call_id.clone()),
        ]
    }

    /// The binder leaves a parameter bound when its value repeats, so a row is only right if
    /// every skipped parameter really held that row's value. Records drawn from small pools
    /// (values repeat often, `None` comes and goes, equal text arrives in different `Arc`s), in
    /// batches of sizes that end mid-statement and in the one-row remainder, must come back
    /// column for column.
    #[test]
    fn rows_are_whole_when_values_repeat_change_and_vanish() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("l.db");
        let mut store = SqliteStore::open(&path).expect("open");
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut pick = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            usize::try_from(seed % n as u64).expect("small")
        };
        let shared = |v: &str| Some(Arc::<str>::from(v));
        let alice = Arc::<str>::from("alice");
        let mut written = Vec::new();
        let mut n = 0_i64;
        for size in [1, 15, 16, 17, 40, 3, 64, 100, 33] {
            let batch: Vec<Record> = (0..size)
                .map(|_| {
                    n += 1;
                    Record {
                        ts_ms: 1_793_491_200_000 + i64::try_from(pick(3)).expect("small"),
                        request_id: format!("mg_{n}"),
                        key: [None, Some(alice.clone()), shared("alice"), shared("bob")][pick(4)]
                            .clone(),
                        key_fp: [None, shared("fp1"), shared("fp2")][pick(3)].clone(),
                        route: [None, shared("/chatbot")][pick(2)].clone(),
                        project: [None, shared("search"), shared("chat")][pick(3)].clone(),
                        project_id: [None, shared("proj_1"), shared("proj_2")][pick(3)].clone(),
                        tags: [None, shared("{}"), shared(r#"{"Team":"core"}"#)][pick(3)].clone(),
                        api: [None, Some("chat.completions"), Some("responses")][pick(3)],
                        model: [None, Some("m1"), Some("m2"), Some("m10")][pick(4)]
                            .map(str::to_owned),
                        stream: pick(2) == 0,
                        status: [200, 429, 502][pick(3)],
                        outcome: ["forwarded", "rejected", "upstream_error"][pick(3)],
                        error_code: [None, Some("rate_limited")][pick(2)],
                        usage: Usage {
                            input: [0, 10, 11][pick(3)],
                            cached_input: [0, 2][pick(2)],
                            output: [0, 5][pick(2)],
                            reasoning: [0, 1][pick(2)],
                        },
                        usage_source: [UsageSource::Reported, UsageSource::None][pick(2)],
                        cost_pico: [None, Some(0), Some(7)][pick(3)],
                        duration_ms: [1.5, 2.25][pick(2)],
                        ttfb_ms: [None, Some(0.5)][pick(2)],
                        upstream_response_id: (pick(2) == 0).then(|| format!("resp_{n}")),
                        ..crate::ledger::sample_record(0)
                    }
                })
                .collect();
            store.write_batch(&batch).expect("write");
            written.extend(batch);
        }
        let conn = open_read_only(&path).expect("read");
        let rows = all_columns(&conn);
        assert_eq!(rows.len(), written.len());
        for (i, (row, r)) in rows.iter().zip(&written).enumerate() {
            assert_eq!(row, &expected_row(r), "row {i}");
        }
    }

    /// The index names on `calls`.
    fn call_indexes(conn: &Connection) -> Vec<String> {
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'calls' AND name NOT LIKE 'sqlite_%' ORDER BY name")
            .expect("prepare");
        stmt.query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    fn keyed(ts_ms: i64, fp: Option<&str>) -> Record {
        Record {
            key_fp: fp.map(Arc::from),
            ..crate::ledger::sample_record(ts_ms)
        }
    }

    #[test]
    fn the_writer_keeps_each_keys_latest_call_and_never_moves_it_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("l.db");
        let mut store = SqliteStore::open(&path).expect("open");
        // Out of order within a batch, and a later batch carrying an older call (a long
        // stream that ended after newer calls were written).
        store
            .write_batch(&[
                keyed(3_000, Some("fp_a")),
                keyed(5_000, Some("fp_a")),
                keyed(4_000, Some("fp_a")),
                keyed(2_000, Some("fp_b")),
                keyed(9_000, None),
            ])
            .expect("first batch");
        store
            .write_batch(&[keyed(1_000, Some("fp_a")), keyed(7_000, Some("fp_b"))])
            .expect("second batch");
        let reader = Reader::new(open_read_only(&path).expect("read"));
        let expected: std::collections::HashMap<String, i64> =
            [("fp_a".to_owned(), 5_000), ("fp_b".to_owned(), 7_000)].into();
        assert_eq!(reader.last_used().expect("last used"), expected);
        // What the table holds is what the calls say.
        let conn = open_read_only(&path).expect("read");
        let from_calls: std::collections::HashMap<String, i64> = conn
            .prepare(
                "SELECT key_fp, MAX(ts_ms) FROM calls WHERE key_fp IS NOT NULL GROUP BY key_fp",
            )
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(from_calls, expected);
        assert_eq!(
            call_indexes(&conn),
            ["calls_call_id", "calls_response", "calls_ts"]
        );
    }

    #[test]
    fn a_version_1_ledger_is_read_as_it_is_and_migrated_with_its_last_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v1.db");
        {
            let conn = Connection::open(&path).expect("create");
            conn.execute_batch(SCHEMA_V1).expect("v1 schema");
            conn.pragma_update(None, "user_version", 1)
                .expect("version");
            for (ts, fp) in [(10, "fp_a"), (30, "fp_a"), (20, "fp_b")] {
                conn.execute(
                    "INSERT INTO calls (ts_ms, request_id, key_fp, status, outcome, usage_source, duration_ms) VALUES (?1, ?2, ?3, 200, 'forwarded', 'reported', 1.0)",
                    params![ts, format!("mg_{ts}"), fp],
                )
                .expect("insert");
            }
        }
        let expected: std::collections::HashMap<String, i64> =
            [("fp_a".to_owned(), 30), ("fp_b".to_owned(), 20)].into();
        // `keys list` on a ledger that no serve of this version has opened yet.
        let before = Reader::new(open_read_only(&path).expect("read v1"));
        assert_eq!(before.last_used().expect("last used, v1"), expected);
        drop(before);

        let mut store = SqliteStore::open(&path).expect("migrate");
        let version: i64 = store
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(
            call_indexes(&store.conn),
            ["calls_call_id", "calls_response", "calls_ts"]
        );
        store
            .write_batch(&[keyed(25, Some("fp_b"))])
            .expect("write after migrating");
        let after = Reader::new(open_read_only(&path).expect("read v2"));
        let expected: std::collections::HashMap<String, i64> =
            [("fp_a".to_owned(), 30), ("fp_b".to_owned(), 25)].into();
        assert_eq!(after.last_used().expect("last used, v2"), expected);
    }

    /// `(rows in calls, requests in daily, cost in daily, priced spend of the calls)`.
    fn totals(path: &Path) -> (i64, i64, i64, i64) {
        let conn = open_read_only(path).expect("read");
        conn.query_row(
            "SELECT (SELECT COUNT(*) FROM calls), (SELECT COALESCE(SUM(requests), 0) FROM daily),
                (SELECT COALESCE(SUM(cost_pico), 0) FROM daily),
                (SELECT COALESCE(SUM(cost_pico), 0) FROM calls)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .expect("totals")
    }

    #[test]
    fn calls_sharing_a_request_id_and_time_are_all_kept_and_a_known_call_id_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("l.db");
        let mut store = SqliteStore::open(&path).expect("open");
        let ts = 1_793_491_200_000;
        // 40 calls with one client-chosen x-request-id echoed back, in one millisecond.
        let calls: Vec<Record> = (0..40)
            .map(|_| Record {
                request_id: "client-chosen".to_owned(),
                ..record(ts, "{}", "m")
            })
            .collect();
        store.write_batch(&calls).expect("write");
        assert_eq!(totals(&path), (40, 40, 4000, 4000));

        // The same batch again (a retry after a lost commit), then a batch mixing known calls,
        // new ones and a new one twice, across a full multi-row insert and the remainder.
        store.write_batch(&calls).expect("retry");
        assert_eq!(totals(&path), (40, 40, 4000, 4000));
        let fresh: Vec<Record> = (0..6).map(|_| record(ts + 1, "{}", "m")).collect();
        let mixed = vec![
            calls[0].clone(),
            fresh[0].clone(),
            fresh[0].clone(),
            calls[1].clone(),
            fresh[1].clone(),
            calls[2].clone(),
            calls[3].clone(),
            fresh[2].clone(),
            calls[4].clone(),
            calls[5].clone(),
            calls[6].clone(),
            calls[7].clone(),
            fresh[3].clone(),
            calls[8].clone(),
            calls[9].clone(),
            fresh[1].clone(),
            // The remainder: known, new, new again.
            calls[10].clone(),
            fresh[4].clone(),
            fresh[4].clone(),
            fresh[0].clone(),
            fresh[5].clone(),
        ];
        assert!(mixed.len() > ROWS_PER_INSERT);
        store.write_batch(&mixed).expect("mixed");
        assert_eq!(totals(&path), (46, 46, 4600, 4600));
        // A batch of known calls only (every row of a multi-row insert skipped).
        store.write_batch(&mixed).expect("mixed again");
        assert_eq!(totals(&path), (46, 46, 4600, 4600));
        let conn = open_read_only(&path).expect("read");
        let distinct: i64 = conn
            .query_row("SELECT COUNT(DISTINCT call_id) FROM calls", [], |r| {
                r.get(0)
            })
            .expect("distinct");
        assert_eq!(distinct, 46);
    }

    #[test]
    fn a_version_2_ledger_gets_call_ids_and_keeps_calls_that_shared_a_request_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v2.db");
        let old = [
            ("req_a", 10),
            ("req_a", 10),
            ("req_b", 10),
            ("req_a", 11),
            ("req_a", 10),
        ];
        {
            let conn = Connection::open(&path).expect("create");
            conn.execute_batch(SCHEMA_V1).expect("v1 schema");
            conn.pragma_update(None, "user_version", 1)
                .expect("version");
            conn.execute_batch(SCHEMA_V2).expect("v2 schema");
            for (request_id, ts) in old {
                conn.execute(
                    "INSERT INTO calls (ts_ms, request_id, status, outcome, usage_source, duration_ms, cost_pico) VALUES (?1, ?2, 200, 'forwarded', 'reported', 1.0, 5)",
                    params![ts, request_id],
                )
                .expect("insert");
            }
        }
        // An export of it before it is migrated (read-only) names no call ids.
        let mut lines = Vec::new();
        let conn = open_read_only(&path).expect("read v2");
        crate::ledger::transfer::export(&conn, 0, 100, &mut lines).expect("export v2");
        drop(conn);
        assert!(!String::from_utf8_lossy(&lines).contains("call_id"));

        let mut store = SqliteStore::open(&path).expect("migrate");
        let version: i64 = store
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
        let ids: Vec<String> = store
            .conn
            .prepare("SELECT call_id FROM calls ORDER BY id")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        let legacy = crate::ledger::legacy_call_id;
        assert_eq!(
            ids,
            [
                legacy("req_a", 10, 0),
                legacy("req_a", 10, 1),
                legacy("req_b", 10, 0),
                legacy("req_a", 11, 0),
                legacy("req_a", 10, 2),
            ]
        );
        // New calls are written beside them, one with the same request id and time too.
        store
            .write_batch(&[Record {
                request_id: "req_a".to_owned(),
                ..crate::ledger::sample_record(10)
            }])
            .expect("write after migrating");
        assert_eq!(totals(&path).0, 6);
        // The old export imported into the migrated ledger finds every call there.
        crate::ledger::transfer::import(&mut store, &mut lines.as_slice(), &mut |_| {})
            .expect("import");
        assert_eq!(totals(&path).0, 6);
    }

    #[test]
    fn a_batch_rolls_up_per_day_and_per_tags_not_per_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("l.db");
        let mut store = SqliteStore::open(&path).expect("open");
        // 2026-10-31 23:59:59.999 and 2026-11-01 00:00:00.000 UTC.
        let (late, early) = (1_793_491_199_999, 1_793_491_200_000);
        let (old_tags, new_tags) = (r#"{"Team":"a"}"#, r#"{"Team":"b"}"#);
        let batch = [
            record(late, old_tags, "m"),
            record(late - 1, old_tags, "m"),
            record(early, old_tags, "m"),
            // Same project id, tags changed by a reload: a row of its own.
            record(early + 1, new_tags, "m"),
            record(early + 2, new_tags, "m"),
            record(early + 3, new_tags, "other"),
        ];
        store.write_batch(&batch).expect("write");
        // Another call in a row a batch already wrote: added to it.
        let again = Record {
            call_id: crate::ledger::new_call_id(late),
            ..batch[0].clone()
        };
        store.write_batch(&[again]).expect("write again");
        let conn = open_read_only(&path).expect("read");
        let mut stmt = conn
            .prepare("SELECT day, tags, model, requests, input_tokens, cost_pico FROM daily ORDER BY day, tags, model")
            .expect("prepare");
        let rows: Vec<(String, String, String, i64, i64, i64)> = rows_of(&mut stmt);
        let row = |day: &str, tags: &str, model: &str, n: i64| {
            (
                day.to_owned(),
                tags.to_owned(),
                model.to_owned(),
                n,
                10 * n,
                100 * n,
            )
        };
        assert_eq!(
            rows,
            [
                row("2026-10-31", old_tags, "m", 3),
                row("2026-11-01", old_tags, "m", 1),
                row("2026-11-01", new_tags, "m", 2),
                row("2026-11-01", new_tags, "other", 1),
            ]
        );
    }

    #[test]
    fn the_outbox_keeps_the_rules_and_survives_a_reopen() {
        use crate::ledger::outbox::{Claim, Outbox as _};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.db");
        crate::ledger::outbox::check_store(&SqliteOutbox::open(&path).expect("open"));
        // What check_store left ("c", claimed once since the release) is still there.
        let again = SqliteOutbox::open(&path).expect("reopen");
        again.release_stale().expect("release");
        assert!(matches!(
            again.claim("later", 5000, 6000),
            Ok(Claim::Row { entry, attempt: 3 }) if entry.id == "c"
        ));
    }
}
