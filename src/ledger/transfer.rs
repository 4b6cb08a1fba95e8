//! Moving records between ledgers: every column of `calls` out as JSON lines, from SQLite or
//! `PostgreSQL`, and back in through any [`Store`].

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::Arc;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::read::Period;
use super::{Record, Store};
use crate::meter::{Usage, UsageSource};

/// One call as exported: every column of the `calls` table, one JSON object per line. Text
/// columns a call did not have are `null`; `cost_pico` is `null` for an unpriced call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallRow {
    /// mantlegate's own id for the call, its identity: an import skips a call whose id the
    /// ledger has. Absent from the lines of older exports (and of a SQLite ledger no newer
    /// mantlegate has opened): the import gives those calls their
    /// [`legacy_call_id`](super::legacy_call_id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    /// Arrival time, Unix milliseconds (UTC).
    pub ts_ms: i64,
    /// The id the client saw in `x-request-id` (not unique).
    pub request_id: String,
    /// Name of the caller's key.
    pub key_name: Option<String>,
    /// The key's fingerprint.
    pub key_fp: Option<String>,
    /// Route prefix.
    pub route: Option<String>,
    /// Project name.
    pub project_name: Option<String>,
    /// Bedrock project ID.
    pub project_id: Option<String>,
    /// The project's tags at call time, a JSON object (`{}` when none).
    pub tags: String,
    /// API family.
    pub api: Option<String>,
    /// Model named in the body.
    pub model: Option<String>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Status sent to the client.
    pub status: u16,
    /// How the call ended.
    pub outcome: String,
    /// mantlegate's error code.
    pub error_code: Option<String>,
    /// Input tokens, cached ones included.
    pub input_tokens: i64,
    /// Input tokens from the prompt cache.
    pub cached_input_tokens: i64,
    /// Output tokens, reasoning ones included.
    pub output_tokens: i64,
    /// Reasoning tokens.
    pub reasoning_tokens: i64,
    /// `reported`, `estimated`, `missing` or `none`.
    pub usage_source: String,
    /// Cost in pico-dollars; `null` when the model had no price.
    pub cost_pico: Option<i64>,
    /// Total duration, ms.
    pub duration_ms: f64,
    /// Time to the first body byte, ms.
    pub ttfb_ms: Option<f64>,
    /// The upstream's response id.
    pub upstream_response_id: Option<String>,
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl CallRow {
    /// The columns a ledger stores for `r`.
    #[must_use]
    pub fn from_record(r: &Record) -> Self {
        Self {
            call_id: Some(r.call_id.clone()),
            ts_ms: r.ts_ms,
            request_id: r.request_id.clone(),
            key_name: r.key.as_deref().map(str::to_owned),
            key_fp: r.key_fp.as_deref().map(str::to_owned),
            route: r.route.as_deref().map(str::to_owned),
            project_name: r.project.as_deref().map(str::to_owned),
            project_id: r.project_id.as_deref().map(str::to_owned),
            tags: r.tags.as_deref().unwrap_or("{}").to_owned(),
            api: r.api.map(str::to_owned),
            model: r.model.clone(),
            stream: r.stream,
            status: r.status,
            outcome: r.outcome.to_owned(),
            error_code: r.error_code.map(str::to_owned),
            input_tokens: to_i64(r.usage.input),
            cached_input_tokens: to_i64(r.usage.cached_input),
            output_tokens: to_i64(r.usage.output),
            reasoning_tokens: to_i64(r.usage.reasoning),
            usage_source: r.usage_source.as_str().to_owned(),
            cost_pico: r.cost_pico,
            duration_ms: r.duration_ms,
            ttfb_ms: r.ttfb_ms,
            upstream_response_id: r.upstream_response_id.clone(),
        }
    }

    /// Takes the usage and cost off: the call is recorded but bills nothing (a background
    /// response another replica already metered).
    pub fn unmeter(&mut self) {
        self.input_tokens = 0;
        self.cached_input_tokens = 0;
        self.output_tokens = 0;
        self.reasoning_tokens = 0;
        UsageSource::None
            .as_str()
            .clone_into(&mut self.usage_source);
        self.cost_pico = Some(0);
    }

    /// The record these columns came from (without background bookkeeping or budget months,
    /// which are not columns of `calls`), named `call_id` when the row has no call id.
    ///
    /// # Errors
    /// A row that breaks a rule of [`CallRow::check`], an unknown `usage_source`, or too many
    /// distinct values in a low-cardinality column.
    fn into_record(
        mut self,
        names: &mut Names,
        call_id: impl FnOnce(&Self) -> String,
    ) -> anyhow::Result<Record> {
        self.check()?;
        let count = |n: i64, what: &str| {
            u64::try_from(n).map_err(|_| anyhow::anyhow!("{what} is negative ({n})"))
        };
        let usage_source = match self.usage_source.as_str() {
            "reported" => UsageSource::Reported,
            "estimated" => UsageSource::Estimated,
            "missing" => UsageSource::Missing,
            "none" => UsageSource::None,
            other => anyhow::bail!(
                "unknown usage_source \"{other}\": expected reported, estimated, missing or none"
            ),
        };
        let call_id = match self.call_id.take() {
            Some(id) => id,
            None => call_id(&self),
        };
        Ok(Record {
            call_id,
            ts_ms: self.ts_ms,
            request_id: self.request_id,
            key: self.key_name.map(Arc::from),
            key_fp: self.key_fp.map(Arc::from),
            route: self.route.map(Arc::from),
            project: self.project_name.map(Arc::from),
            project_id: self.project_id.map(Arc::from),
            tags: Some(Arc::from(self.tags)),
            api: self.api.map(|s| names.get(s)).transpose()?,
            model: self.model,
            stream: self.stream,
            status: self.status,
            outcome: names.get(self.outcome)?,
            error_code: self.error_code.map(|s| names.get(s)).transpose()?,
            usage: Usage {
                input: count(self.input_tokens, "input_tokens")?,
                cached_input: count(self.cached_input_tokens, "cached_input_tokens")?,
                output: count(self.output_tokens, "output_tokens")?,
                reasoning: count(self.reasoning_tokens, "reasoning_tokens")?,
            },
            usage_source,
            cost_pico: self.cost_pico,
            duration_ms: self.duration_ms,
            ttfb_ms: self.ttfb_ms,
            upstream_response_id: self.upstream_response_id,
            background: None,
            budget_months: Vec::new(),
        })
    }
}

/// First millisecond of the year 9999 (UTC): no ledger partition holds a call from then on.
const MAX_TS_MS: i64 = 253_370_764_800_000;

impl CallRow {
    /// The rules a line must keep to be imported, so that no import can bend the bill: no
    /// negative token count or cost, cached tokens within the input tokens, reasoning tokens
    /// within the output tokens, tags a JSON object of strings, durations not negative, a time
    /// from 1970 to the year 9998, a non-empty call id. (Unknown fields are refused when the
    /// line is parsed.)
    ///
    /// # Errors
    /// The first rule broken, naming the field.
    pub fn check(&self) -> anyhow::Result<()> {
        for (what, n) in [
            ("input_tokens", self.input_tokens),
            ("cached_input_tokens", self.cached_input_tokens),
            ("output_tokens", self.output_tokens),
            ("reasoning_tokens", self.reasoning_tokens),
        ] {
            anyhow::ensure!(n >= 0, "{what} is negative ({n})");
        }
        if let Some(cost) = self.cost_pico {
            anyhow::ensure!(cost >= 0, "cost_pico is negative ({cost})");
        }
        anyhow::ensure!(
            self.cached_input_tokens <= self.input_tokens,
            "cached_input_tokens ({}) is more than input_tokens ({}), which count them",
            self.cached_input_tokens,
            self.input_tokens
        );
        anyhow::ensure!(
            self.reasoning_tokens <= self.output_tokens,
            "reasoning_tokens ({}) is more than output_tokens ({}), which count them",
            self.reasoning_tokens,
            self.output_tokens
        );
        serde_json::from_str::<HashMap<String, String>>(&self.tags)
            .map_err(|e| anyhow::anyhow!("tags is not a JSON object of strings: {e}"))?;
        anyhow::ensure!(
            self.duration_ms >= 0.0,
            "duration_ms is negative ({})",
            self.duration_ms
        );
        if let Some(ttfb) = self.ttfb_ms {
            anyhow::ensure!(ttfb >= 0.0, "ttfb_ms is negative ({ttfb})");
        }
        anyhow::ensure!(
            (0..MAX_TS_MS).contains(&self.ts_ms),
            "ts_ms {} is out of range (1970 to the year 9998)",
            self.ts_ms
        );
        anyhow::ensure!(
            self.call_id.as_ref().is_none_or(|id| !id.is_empty()),
            "call_id is empty"
        );
        Ok(())
    }
}

/// Turns the text of the low-cardinality columns (api, outcome, error code) back into the
/// `&'static str` a [`Record`] holds. The names mantlegate writes are matched; another value
/// (an error code of a newer version) is leaked once, which an import, a one-shot command,
/// can afford for a bounded number of values.
struct Names(HashMap<String, &'static str>);

/// Distinct unknown values an import accepts in the low-cardinality columns.
const MAX_NAMES: usize = 1000;

const KNOWN_NAMES: &[&str] = &[
    "chat.completions",
    "responses",
    "models",
    "forwarded",
    "rejected",
    "upstream_error",
    "client_disconnect",
    "client_stalled",
];

impl Names {
    fn new() -> Self {
        Self(KNOWN_NAMES.iter().map(|&s| (s.to_owned(), s)).collect())
    }

    fn get(&mut self, s: String) -> anyhow::Result<&'static str> {
        if let Some(&name) = self.0.get(&s) {
            return Ok(name);
        }
        anyhow::ensure!(
            self.0.len() < MAX_NAMES + KNOWN_NAMES.len(),
            "more than {MAX_NAMES} distinct api, outcome or error_code values"
        );
        let name: &'static str = Box::leak(s.clone().into_boxed_str());
        self.0.insert(s, name);
        Ok(name)
    }
}

/// A ledger whose calls can be read back, column by column.
pub trait RecordSource {
    /// Calls `each` with every call in `[from_ms, to_ms)`, oldest first.
    ///
    /// # Errors
    /// Storage errors, or the first error of `each` (which stops the reading).
    fn rows_between(
        &self,
        from_ms: i64,
        to_ms: i64,
        each: &mut dyn FnMut(CallRow) -> anyhow::Result<()>,
    ) -> anyhow::Result<()>;
}

/// The export query; `{call_id}` is the column, or `NULL` in a ledger older than call ids
/// (opened read-only, not migrated).
const SQLITE_ROWS_SQL: &str = "SELECT ts_ms, request_id, key_name, key_fp, route, project_name,
    project_id, tags, api, model, stream, status, outcome, error_code, input_tokens,
    cached_input_tokens, output_tokens, reasoning_tokens, usage_source, cost_pico, duration_ms,
    ttfb_ms, upstream_response_id, {call_id}
    FROM calls WHERE ts_ms >= ?1 AND ts_ms < ?2 ORDER BY ts_ms, id";

fn sqlite_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CallRow> {
    let status: i64 = r.get(11)?;
    Ok(CallRow {
        ts_ms: r.get(0)?,
        request_id: r.get(1)?,
        key_name: r.get(2)?,
        key_fp: r.get(3)?,
        route: r.get(4)?,
        project_name: r.get(5)?,
        project_id: r.get(6)?,
        tags: r.get(7)?,
        api: r.get(8)?,
        model: r.get(9)?,
        stream: r.get(10)?,
        status: u16::try_from(status).unwrap_or(0),
        outcome: r.get(12)?,
        error_code: r.get(13)?,
        input_tokens: r.get(14)?,
        cached_input_tokens: r.get(15)?,
        output_tokens: r.get(16)?,
        reasoning_tokens: r.get(17)?,
        usage_source: r.get(18)?,
        cost_pico: r.get(19)?,
        duration_ms: r.get(20)?,
        ttfb_ms: r.get(21)?,
        upstream_response_id: r.get(22)?,
        call_id: r.get(23)?,
    })
}

/// A SQLite ledger connection (e.g. from `sqlite::open_read_only`) read in one streaming query.
impl RecordSource for rusqlite::Connection {
    fn rows_between(
        &self,
        from_ms: i64,
        to_ms: i64,
        each: &mut dyn FnMut(CallRow) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let version: i64 = self.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let column = if version >= 3 { "call_id" } else { "NULL" };
        let mut stmt = self
            .prepare(&SQLITE_ROWS_SQL.replace("{call_id}", column))
            .context("preparing the export query")?;
        let mut rows = stmt.query([from_ms, to_ms])?;
        while let Some(row) = rows.next()? {
            each(sqlite_row(row)?)?;
        }
        Ok(())
    }
}

/// The Unix-millisecond bounds `[from, to)` of a period of UTC days.
///
/// # Errors
/// A day jiff cannot place in time.
pub fn period_ms(period: &Period) -> anyhow::Result<(i64, i64)> {
    let ms = |d: jiff::civil::Date| -> anyhow::Result<i64> {
        Ok(d.to_zoned_datetime(jiff::tz::TimeZone::UTC)?
            .timestamp()
            .as_millisecond())
    };
    Ok((ms(period.from)?, ms(period.to)?))
}

/// Writes every call of `[from_ms, to_ms)` to `out`, one JSON object ([`CallRow`]) per line,
/// oldest first; returns how many.
///
/// # Errors
/// Storage or output errors.
pub fn export(
    source: &dyn RecordSource,
    from_ms: i64,
    to_ms: i64,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let mut n = 0u64;
    source.rows_between(from_ms, to_ms, &mut |row| {
        serde_json::to_writer(&mut *out, &row)?;
        out.write_all(b"\n")?;
        n += 1;
        Ok(())
    })?;
    out.flush()?;
    Ok(n)
}

/// Call ids for the lines of an older export, which have none.
#[derive(Default)]
struct LegacyIds {
    /// Lines seen per request id and time, by the first 16 bytes of that pair's hash.
    seen: HashMap<[u8; 16], u64>,
}

impl LegacyIds {
    fn name(&mut self, row: &CallRow) -> String {
        let first = super::legacy_call_id(&row.request_id, row.ts_ms, 0);
        let mut key = [0u8; 16];
        // The id is `mgr_` and 32 hex digits: its digits are the key.
        if hex::decode_to_slice(&first[4..], &mut key).is_err() {
            return first;
        }
        let nth = self.seen.entry(key).or_insert(0);
        let id = if *nth == 0 {
            first
        } else {
            super::legacy_call_id(&row.request_id, row.ts_ms, *nth)
        };
        *nth += 1;
        id
    }
}

/// Records an import hands the store at a time (all in one transaction).
const IMPORT_BATCH: usize = 1000;

/// Longest line an import reads: an exported call is well under a kilobyte.
const MAX_LINE_BYTES: u64 = 1 << 20;

/// Reads JSON lines written by [`export`] (blank lines are skipped) and writes them through
/// `store` in one transaction: every line or none. Each line is checked ([`CallRow::check`])
/// before anything is committed; `annotate` may complete each record first (e.g. its budget
/// months, so that a `PostgreSQL` ledger counts imported spend in `budget_spend`). Returns how
/// many records were read. Idempotent: a call whose id the ledger has is skipped, so importing
/// the same lines twice changes nothing. Lines without a call id (older exports) get their
/// [`legacy_call_id`](super::legacy_call_id), the n-th line with the same request id and time
/// counted as the n-th such call (remembered for the whole import: 32 bytes or so per such line).
///
/// # Errors
/// The first line refused (`line N: why`), or a storage error; nothing is written then.
pub fn import(
    store: &mut dyn Store,
    input: &mut dyn BufRead,
    annotate: &mut dyn FnMut(&mut Record),
) -> anyhow::Result<u64> {
    let mut names = Names::new();
    let mut legacy = LegacyIds::default();
    let mut n = 0u64;
    let mut line = Vec::new();
    let mut number = 0u64;
    let mut next = || -> anyhow::Result<Option<Vec<Record>>> {
        let mut batch = Vec::with_capacity(IMPORT_BATCH);
        while batch.len() < IMPORT_BATCH {
            line.clear();
            let read = std::io::Read::take(&mut *input, MAX_LINE_BYTES + 1)
                .read_until(b'\n', &mut line)
                .context("reading the import")?;
            if read == 0 {
                break;
            }
            number += 1;
            anyhow::ensure!(
                line.len() as u64 <= MAX_LINE_BYTES,
                "line {number}: longer than {MAX_LINE_BYTES} bytes"
            );
            if line.trim_ascii().is_empty() {
                continue;
            }
            let mut record = serde_json::from_slice::<CallRow>(&line)
                .map_err(anyhow::Error::from)
                .and_then(|row| row.into_record(&mut names, |row| legacy.name(row)))
                .with_context(|| format!("line {number}"))?;
            annotate(&mut record);
            batch.push(record);
            n += 1;
        }
        Ok((!batch.is_empty()).then_some(batch))
    };
    store
        .write_all(&mut next)
        .context("ledger import refused, nothing was written")?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::{CallRow, Names, export, import};
    use crate::ledger::sqlite::SqliteStore;
    use crate::ledger::{Record, Store};

    fn record(n: i64) -> Record {
        Record {
            request_id: format!("mg_{n}"),
            stream: n % 2 == 0,
            error_code: (n == 3).then_some("some_new_code"),
            cost_pico: (n != 2).then_some(1_234_567),
            ..crate::ledger::sample_record(1_780_000_000_000 + n)
        }
    }

    #[test]
    fn sqlite_export_import_export_is_identical() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a.db");
        let b = dir.path().join("b.db");
        let records: Vec<Record> = (0..5).map(record).collect();
        SqliteStore::open(&a)
            .expect("open")
            .write_batch(&records)
            .expect("write");
        let mut first = Vec::new();
        let conn = crate::ledger::sqlite::open_read_only(&a).expect("read");
        assert_eq!(export(&conn, 0, i64::MAX, &mut first).expect("export"), 5);
        let mut store = SqliteStore::open(&b).expect("open");
        let mut annotated = 0;
        let n = import(&mut store, &mut first.as_slice(), &mut |_| annotated += 1).expect("import");
        assert_eq!((n, annotated), (5, 5));
        let mut second = Vec::new();
        let conn = crate::ledger::sqlite::open_read_only(&b).expect("read");
        export(&conn, 0, i64::MAX, &mut second).expect("export");
        assert_eq!(
            String::from_utf8_lossy(&first),
            String::from_utf8_lossy(&second)
        );
        let line: CallRow =
            serde_json::from_slice(first.split(|&b| b == b'\n').next().expect("line"))
                .expect("json");
        assert_eq!(line, CallRow::from_record(&records[0]));
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SqliteStore::open(&dir.path().join("c.db")).expect("open");
        let good = serde_json::to_string(&CallRow::from_record(&record(1))).expect("json");
        let mut bad = CallRow::from_record(&record(2));
        bad.usage_source = "guessed".to_owned();
        let bad = serde_json::to_string(&bad).expect("json");
        let input = format!("{good}\n\n{bad}\n");
        let err = import(&mut store, &mut input.as_bytes(), &mut |_| {}).expect_err("refused");
        let msg = format!("{err:#}");
        assert!(msg.contains("line 3") && msg.contains("guessed"), "{msg}");
        let input = format!("{good}\n{{\"ts_ms\":1,\"extra\":true}}\n");
        let err = import(&mut store, &mut input.as_bytes(), &mut |_| {}).expect_err("refused");
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
    }

    /// Lines that break a rule, each as `(what is changed in a good line, what the error says)`.
    fn hostile_lines() -> Vec<(String, &'static str)> {
        let good = serde_json::to_value(CallRow::from_record(&record(7))).expect("json");
        let with = |field: &str, value: serde_json::Value| {
            let mut v = good.clone();
            v[field] = value;
            v.to_string()
        };
        vec![
            (
                with("cost_pico", (-1_000_000_000_000_i64).into()),
                "cost_pico is negative",
            ),
            (
                with("input_tokens", (-5).into()),
                "input_tokens is negative",
            ),
            (
                with("output_tokens", (-5).into()),
                "output_tokens is negative",
            ),
            (
                with("cached_input_tokens", 11.into()),
                "cached_input_tokens (11) is more than input_tokens (10)",
            ),
            (
                with("reasoning_tokens", 6.into()),
                "reasoning_tokens (6) is more than output_tokens (5)",
            ),
            (
                with("tags", "[1,2]".into()),
                "tags is not a JSON object of strings",
            ),
            (
                with("tags", "not json".into()),
                "tags is not a JSON object of strings",
            ),
            (
                with("tags", r#"{"team":7}"#.into()),
                "tags is not a JSON object of strings",
            ),
            (
                with("duration_ms", (-1.0).into()),
                "duration_ms is negative",
            ),
            (with("ts_ms", (-1).into()), "ts_ms -1 is out of range"),
            (with("extra", true.into()), "unknown field `extra`"),
            (r#"{"ts_ms":1,"#.to_owned(), "EOF while parsing"),
        ]
    }

    #[test]
    fn every_hostile_line_is_refused_with_its_number_and_nothing_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("h.db");
        let mut store = SqliteStore::open(&path).expect("open");
        let good: String = (100..1600)
            .map(|n| serde_json::to_string(&CallRow::from_record(&record(n))).expect("json") + "\n")
            .collect();
        for (bad, says) in hostile_lines() {
            // 1,500 good lines, then the bad one: three batches' worth before it.
            let input = format!("{good}{bad}\n");
            let err = import(&mut store, &mut input.as_bytes(), &mut |_| {}).expect_err(&bad);
            let msg = format!("{err:#}");
            assert!(msg.contains(&format!("line 1501: {says}")), "{msg}");
            assert!(msg.contains("nothing was written"), "{msg}");
            assert_eq!(contents(&path), (0, 0, Vec::new()), "{bad}");
        }
        // The good lines alone go in whole, and a second import changes nothing.
        assert_eq!(
            import(&mut store, &mut good.as_bytes(), &mut |_| {}).expect("import"),
            1500
        );
        let first = contents(&path);
        assert_eq!((first.0, first.1), (1500, 1500));
        import(&mut store, &mut good.as_bytes(), &mut |_| {}).expect("import again");
        assert_eq!(contents(&path), first);
    }

    /// `(calls, requests in the daily roll-up, call ids)` of a SQLite ledger.
    fn contents(path: &std::path::Path) -> (i64, i64, Vec<String>) {
        let conn = crate::ledger::sqlite::open_read_only(path).expect("read");
        let (calls, requests) = conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM calls), COALESCE((SELECT SUM(requests) FROM daily), 0)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("totals");
        let ids = conn
            .prepare("SELECT call_id FROM calls ORDER BY id")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("ids");
        (calls, requests, ids)
    }

    #[test]
    fn importing_a_file_twice_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.db");
        // Calls sharing one request id and time: distinct calls all the same.
        let records: Vec<Record> = (0..5)
            .map(|_| Record {
                request_id: "client-chosen".to_owned(),
                ..record(1)
            })
            .collect();
        let lines: String = records
            .iter()
            .map(|r| {
                let line = serde_json::to_string(&CallRow::from_record(r)).expect("json");
                assert!(
                    line.contains(&format!(r#""call_id":"{}""#, r.call_id)),
                    "{line}"
                );
                line + "\n"
            })
            .collect();
        let mut store = SqliteStore::open(&path).expect("open");
        import(&mut store, &mut lines.as_bytes(), &mut |_| {}).expect("import");
        let first = contents(&path);
        assert_eq!(
            first,
            (5, 5, records.iter().map(|r| r.call_id.clone()).collect())
        );
        let n = import(&mut store, &mut lines.as_bytes(), &mut |_| {}).expect("import again");
        assert_eq!(n, 5, "every line read");
        assert_eq!(contents(&path), first);
    }

    #[test]
    fn an_older_export_without_call_ids_imports_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("e.db");
        // Lines as an export before call ids wrote them: two calls share a request id and time.
        let old = |request_id: &str, ts: i64| {
            let mut row = CallRow::from_record(&record(ts));
            row.call_id = None;
            request_id.clone_into(&mut row.request_id);
            let line = serde_json::to_string(&row).expect("json");
            assert!(!line.contains("call_id"), "{line}");
            line + "\n"
        };
        let lines = [
            old("req_a", 1),
            old("req_a", 1),
            old("req_b", 1),
            old("req_a", 2),
        ]
        .concat();
        let mut store = SqliteStore::open(&path).expect("open");
        import(&mut store, &mut lines.as_bytes(), &mut |_| {}).expect("import");
        let ts = |n: i64| 1_780_000_000_000 + n;
        let legacy = crate::ledger::legacy_call_id;
        let first = contents(&path);
        assert_eq!(
            first,
            (
                4,
                4,
                vec![
                    legacy("req_a", ts(1), 0),
                    legacy("req_a", ts(1), 1),
                    legacy("req_b", ts(1), 0),
                    legacy("req_a", ts(2), 0),
                ]
            )
        );
        import(&mut store, &mut lines.as_bytes(), &mut |_| {}).expect("import again");
        assert_eq!(contents(&path), first);
    }

    #[test]
    fn names_are_matched_then_interned_once() {
        let mut names = Names::new();
        let a = names.get("forwarded".to_owned()).expect("known");
        assert_eq!(a, "forwarded");
        let b = names.get("brand_new".to_owned()).expect("new");
        let c = names.get("brand_new".to_owned()).expect("again");
        assert!(std::ptr::eq(b, c));
    }
}
