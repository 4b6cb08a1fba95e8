//! The `PostgreSQL` ledger against a real server: the same reports as SQLite, idempotent
//! retries, partitions and retention, migrations, export and import, reconnection. Each test
//! makes its own database on `MANTLEGATE_TEST_POSTGRES_URL` (tests/common/services.rs).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::pg::{TestDb, exec, runtime, scalar};
use mantlegate::ledger::postgres::{self, PgFleet, PgReader, PostgresStore};
use mantlegate::ledger::sqlite::{self, Reader, SqliteStore};
use mantlegate::ledger::transfer::{self, CallRow};
use mantlegate::ledger::{Background, Ledger, LedgerRead, LedgerStats, Record, Store};
use mantlegate::meter::{Usage, UsageSource};
use mantlegate::report::{self, DailyRow, Period};

fn ms(s: &str) -> i64 {
    s.parse::<jiff::Timestamp>()
        .expect("timestamp")
        .as_millisecond()
}

fn day(s: &str) -> jiff::civil::Date {
    s.parse().expect("date")
}

fn period(from: &str, to: &str) -> Period {
    Period {
        from: day(from),
        to: day(to),
    }
}

/// A deterministic mix of calls over four days around a month boundary: projects with and
/// without tags, unpriced models, rejections, streams, background responses created and
/// settled, budgets.
fn fixture(n: u64) -> Vec<Record> {
    let projects: [(Option<&str>, Option<&str>, Option<&str>); 3] = [
        (
            Some("search"),
            Some("proj_search"),
            Some(r#"{"env":"prod","team":"core"}"#),
        ),
        (Some("ads"), Some("proj_ads"), Some(r#"{"team":"ads"}"#)),
        (None, None, None),
    ];
    let keys = [Some("alice"), Some("bob"), None];
    let models = [Some("gpt-x"), Some("unpriced-model"), None];
    let outcomes = [
        "forwarded",
        "forwarded",
        "rejected",
        "upstream_error",
        "client_disconnect",
    ];
    let start = ms("2026-01-30T22:00:00Z");
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..n)
        .map(|i| {
            let r = next();
            let (project, project_id, tags) = pick(&projects, r);
            let model = pick(&models, r >> 8);
            let outcome = pick(&outcomes, r >> 16);
            let priced = model == Some("gpt-x");
            let api = pick(&["chat.completions", "responses"], r >> 20);
            let key = pick(&keys, r >> 4);
            let input = (r >> 24) % 5000;
            let output = (r >> 36) % 3000;
            let background = match i % 17 {
                3 => Some(Background::Pending),
                // Every other one is settled two calls later; the rest stay pending.
                _ if i % 34 == 5 => Some(Background::Settled),
                _ => None,
            };
            let response = match background {
                Some(Background::Pending) => Some(format!("resp_bg_{i}")),
                Some(Background::Settled) => Some(format!("resp_bg_{}", i - 2)),
                None => (api == "responses").then(|| format!("resp_{i}")),
            };
            let ts_ms = start + i64::try_from(r % (4 * 86_400_000)).expect("ts");
            let budget_months = match project {
                Some(p) => vec![
                    (
                        Arc::from(format!("{p}-monthly")),
                        Arc::from(month_of(ts_ms)),
                    ),
                    (Arc::from("everything"), Arc::from(month_of(ts_ms))),
                ],
                None => Vec::new(),
            };
            Record {
                call_id: format!("mg_{ts_ms:012x}{i:020x}"),
                ts_ms,
                request_id: format!("mg_{i:024x}"),
                key: key.map(Arc::from),
                key_fp: key.map(|k| Arc::from(format!("fp_{k}"))),
                route: (r % 7 == 0).then(|| Arc::from("/team-a")),
                project: project.map(Arc::from),
                project_id: project_id.map(Arc::from),
                tags: tags.map(Arc::from),
                api: Some(api),
                model: model.map(str::to_owned),
                stream: r % 2 == 0,
                status: if outcome == "rejected" { 429 } else { 200 },
                outcome,
                error_code: (outcome == "rejected").then_some("rate_limit_exceeded"),
                usage: Usage {
                    input,
                    cached_input: input / 3,
                    output,
                    reasoning: output / 4,
                },
                usage_source: if outcome == "client_disconnect" {
                    UsageSource::Estimated
                } else {
                    UsageSource::Reported
                },
                cost_pico: priced
                    .then(|| i64::try_from(input * 150_000 + output * 600_000).expect("cost")),
                duration_ms: f64::from(u32::try_from(r % 100_000).expect("small")) / 7.0,
                ttfb_ms: (r % 3 != 0).then_some(12.5),
                upstream_response_id: response,
                background,
                budget_months,
            }
        })
        .collect()
}

/// The item `r` points at.
fn pick<T: Copy>(items: &[T], r: u64) -> T {
    let len = u64::try_from(items.len()).expect("len");
    items[usize::try_from(r % len).expect("index")]
}

/// `YYYY-MM` (UTC) of a time.
fn month_of(ts_ms: i64) -> String {
    sqlite::utc_day(ts_ms)[..7].to_owned()
}

fn sorted(mut rows: Vec<DailyRow>) -> Vec<DailyRow> {
    rows.sort_by(|a, b| {
        let key = |r: &DailyRow| {
            (
                r.day.clone(),
                r.key_name.clone(),
                r.route.clone(),
                r.project_name.clone(),
                r.project_id.clone(),
                r.tags.clone(),
                r.api.clone(),
                r.model.clone(),
                r.outcome.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    rows
}

fn write_in_batches(store: &mut dyn Store, records: &[Record], size: usize) {
    for chunk in records.chunks(size) {
        store.write_batch(chunk).expect("write batch");
    }
}

/// Both ledgers answer every read alike, and every report is the same.
fn assert_same_ledger(sqlite: &dyn LedgerRead, pg: &dyn LedgerRead, span: Period) {
    let a = sorted(sqlite.daily(&span).expect("sqlite daily"));
    let b = sorted(pg.daily(&span).expect("pg daily"));
    assert!(!a.is_empty());
    assert_eq!(a, b, "daily roll-ups differ");
    for dims in [
        "project",
        "model,key",
        "tag:team,day",
        "month,outcome,api,route",
        "tag:env,project,model",
    ] {
        let dims = report::parse_dims(dims).expect("dims");
        let ra = report::aggregate(&a, &dims, span);
        let rb = report::aggregate(&b, &dims, span);
        assert_eq!(ra, rb);
        for format in ["csv", "json", "focus"] {
            let f: report::Format = format.parse().expect("format");
            assert_eq!(report::render(&ra, f), report::render(&rb, f));
        }
    }
    let narrow = period("2026-01-31", "2026-02-02");
    assert_eq!(
        sorted(sqlite.daily(&narrow).expect("daily")),
        sorted(pg.daily(&narrow).expect("daily"))
    );
    assert_eq!(sqlite.count().expect("count"), pg.count().expect("count"));
    let (from, to) = (ms("2026-01-31T00:00:00Z"), ms("2026-02-01T00:00:00Z"));
    let mut sa = sqlite.spend_between(from, to).expect("spend");
    let mut sb = pg.spend_between(from, to).expect("spend");
    sa.sort();
    sb.sort();
    assert!(!sa.is_empty());
    assert_eq!(sa, sb);
    assert_eq!(
        sqlite.last_used().expect("last used"),
        pg.last_used().expect("last used")
    );
    let mut pa = sqlite.pending_background().expect("pending");
    let mut pb = pg.pending_background().expect("pending");
    pa.sort();
    pb.sort();
    assert!(!pa.is_empty());
    assert_eq!(pa, pb);
    for id in ["resp_bg_3", "resp_1", "resp_2", "resp_7", "resp_none"] {
        assert_eq!(
            sqlite.project_of_response(id).expect("lookup"),
            pg.project_of_response(id).expect("lookup"),
            "{id}"
        );
    }
}

fn whole() -> Period {
    period("2026-01-01", "2026-03-01")
}

#[test]
fn the_same_calls_give_the_same_reports_from_sqlite_and_postgres() {
    let Some(db) = TestDb::create("same reports") else {
        return;
    };
    let records = fixture(400);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.db");
    let mut lite = SqliteStore::open(&path).expect("sqlite");
    write_in_batches(&mut lite, &records, 37);
    let mut pg = PostgresStore::connect(&db.url).expect("postgres");
    // Other batch boundaries: the roll-ups must not depend on them.
    write_in_batches(&mut pg, &records, 61);
    let lite_reader = Reader::new(sqlite::open_read_only(&path).expect("read"));
    let pg_reader = PgReader::connect(&db.url).expect("reader");
    assert_eq!(pg_reader.count().expect("count"), 400);
    assert_same_ledger(&lite_reader, &pg_reader, whole());
}

/// Sum of the priced cost of `records` per `(budget, month)`.
fn expected_budgets(records: &[Record]) -> BTreeMap<(String, String), i64> {
    let mut out = BTreeMap::new();
    for r in records {
        for (b, m) in &r.budget_months {
            if let Some(c) = r.cost_pico {
                *out.entry((b.to_string(), m.to_string())).or_insert(0) += c;
            }
        }
    }
    out
}

#[test]
fn a_retried_batch_is_counted_once() {
    let Some(db) = TestDb::create("retried batch") else {
        return;
    };
    let records = fixture(120);
    let mut store = PostgresStore::connect(&db.url).expect("postgres");
    store.write_batch(&records).expect("write");
    let reader = PgReader::connect(&db.url).expect("reader");
    let daily = sorted(reader.daily(&whole()).expect("daily"));
    let expected = expected_budgets(&records);
    let keys: Vec<(String, String)> = expected
        .keys()
        .cloned()
        .chain([("nobody".to_owned(), "2026-01".to_owned())])
        .collect();
    let mut want: Vec<i64> = expected.values().copied().collect();
    want.push(0);
    assert!(want.iter().filter(|&&v| v > 0).count() >= 4);
    assert_eq!(reader.budget_spend(&keys).expect("budgets"), want);

    // The same batch again (a retry after a lost commit answer), then again from a new
    // connection (a restarted writer), then a batch holding one record twice.
    store.write_batch(&records).expect("retry");
    PostgresStore::connect(&db.url)
        .expect("second writer")
        .write_batch(&records[10..50])
        .expect("overlap");
    let doubled = [records[0].clone(), records[0].clone()];
    store.write_batch(&doubled).expect("doubled");
    assert_eq!(reader.count().expect("count"), 120);
    assert_eq!(sorted(reader.daily(&whole()).expect("daily")), daily);
    assert_eq!(reader.budget_spend(&keys).expect("budgets"), want);

    // A genuinely new call in the same day and group is still added.
    // Its request id and time are those of a call already there (an id a client chose and
    // the upstream echoed): it is a call of its own all the same.
    let mut fresh = records[0].clone();
    fresh.call_id = mantlegate::ledger::new_call_id(fresh.ts_ms);
    store.write_batch(&[fresh.clone()]).expect("fresh");
    assert_eq!(reader.count().expect("count"), 121);
    let requests = |rows: &[DailyRow]| rows.iter().map(|r| r.requests).sum::<i64>();
    assert_eq!(
        requests(&reader.daily(&whole()).expect("daily")),
        requests(&daily) + 1
    );
    let first = &fresh.budget_months[0];
    let idx = keys
        .iter()
        .position(|k| k.0 == first.0.as_ref() && k.1 == first.1.as_ref())
        .expect("budget key");
    let after = reader.budget_spend(&keys).expect("budgets");
    assert_eq!(after[idx], want[idx] + fresh.cost_pico.unwrap_or(0));
}

fn simple(request_id: &str, ts: &str) -> Record {
    let mut r = fixture(1).remove(0);
    request_id.clone_into(&mut r.request_id);
    r.ts_ms = ms(ts);
    r.call_id = mantlegate::ledger::new_call_id(r.ts_ms);
    r.background = None;
    r.upstream_response_id = None;
    r
}

#[test]
fn new_months_get_partitions_and_retention_drops_old_ones_but_not_daily() {
    let Some(db) = TestDb::create("partitions and retention") else {
        return;
    };
    let mut store = PostgresStore::connect(&db.url).expect("postgres");
    let reader = PgReader::connect(&db.url).expect("reader");
    let now = mantlegate_now_partition();
    let parts = reader.partitions().expect("partitions");
    assert!(parts.contains(&now), "{parts:?} lacks {now}");

    // A month far ahead: its partition (and the next month's) is made on the way.
    store
        .write_batch(&[simple("far", "2031-03-15T10:00:00Z")])
        .expect("far month");
    let parts = reader.partitions().expect("partitions");
    assert!(parts.contains(&"calls_2031_03".to_owned()), "{parts:?}");
    assert!(parts.contains(&"calls_2031_04".to_owned()), "{parts:?}");

    let old = [
        simple("jan", "2030-01-10T00:00:00Z"),
        simple("feb", "2030-02-10T00:00:00Z"),
        simple("mar", "2030-03-31T23:59:59.999Z"),
    ];
    store.write_batch(&old).expect("old months");
    let span = period("2030-01-01", "2030-04-01");
    let daily = sorted(reader.daily(&span).expect("daily"));
    assert_eq!(daily.len(), 3);
    assert_eq!(reader.count().expect("count"), 4);

    // Keep 2 months on 2030-04-15: February, March and April stay; January and before go.
    let dropped = reader
        .fleet()
        .apply_retention(2, ms("2030-04-15T00:00:00Z"))
        .expect("retention");
    assert!(dropped.contains(&"calls_2030_01".to_owned()), "{dropped:?}");
    assert!(
        dropped.iter().all(|p| p.as_str() < "calls_2030_02"),
        "{dropped:?}"
    );
    let parts = reader.partitions().expect("partitions");
    assert!(!parts.contains(&"calls_2030_01".to_owned()));
    assert!(parts.contains(&"calls_2030_02".to_owned()));
    assert_eq!(reader.count().expect("count"), 3);
    assert_eq!(sorted(reader.daily(&span).expect("daily")), daily);
    assert!(
        reader
            .fleet()
            .apply_retention(0, ms("2030-04-15T00:00:00Z"))
            .is_err()
    );
    assert!(
        reader
            .fleet()
            .apply_retention(2, ms("2030-04-15T00:00:00Z"))
            .expect("again")
            .is_empty()
    );

    // A late record of the dropped month: this writer thought its partition existed.
    store
        .write_batch(&[simple("late", "2030-01-20T00:00:00Z")])
        .expect("late record");
    assert!(
        reader
            .partitions()
            .expect("partitions")
            .contains(&"calls_2030_01".to_owned())
    );
    assert_eq!(reader.count().expect("count"), 4);
}

/// `calls_YYYY_MM` of the current UTC month.
fn mantlegate_now_partition() -> String {
    let now = jiff::Timestamp::now().as_millisecond();
    format!("calls_{}", month_of(now).replace('-', "_"))
}

#[test]
fn two_concurrent_migrators_apply_each_migration_once() {
    let Some(db) = TestDb::create("concurrent migrations") else {
        return;
    };
    let barrier = Arc::new(Barrier::new(3));
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let url = db.url.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                postgres::migrate(&url).expect("migrate")
            })
        })
        .collect();
    let mut applied: Vec<Vec<u32>> = runs
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    applied.sort();
    let all: Vec<u32> = (1..=postgres::SCHEMA_VERSION).collect();
    assert_eq!(applied, vec![vec![], vec![], all]);
    assert!(postgres::migrate(&db.url).expect("again").is_empty());
    assert_eq!(
        scalar(&db.url, "SELECT count(*) FROM schema_migrations"),
        i64::from(postgres::SCHEMA_VERSION)
    );
    // And a writer starting on a migrated database applies nothing either.
    PostgresStore::connect(&db.url).expect("writer");
    assert_eq!(
        scalar(&db.url, "SELECT count(*) FROM schema_migrations"),
        i64::from(postgres::SCHEMA_VERSION)
    );
}

#[test]
fn a_newer_schema_is_refused_and_an_empty_database_is_not_read() {
    let Some(db) = TestDb::create("newer schema") else {
        return;
    };
    let err = PgReader::connect(&db.url).err().expect("no schema yet");
    assert!(format!("{err:#}").contains("mantlegate migrate"), "{err:#}");
    postgres::migrate(&db.url).expect("migrate");
    exec(
        &db.url,
        "INSERT INTO schema_migrations (version) VALUES (999)",
    );
    for err in [
        postgres::migrate(&db.url).expect_err("migrate refuses"),
        PostgresStore::connect(&db.url)
            .err()
            .expect("writer refuses"),
        PgReader::connect(&db.url).err().expect("reader refuses"),
    ] {
        let msg = format!("{err:#}");
        assert!(
            msg.contains("schema version 999") && msg.contains("newer") && msg.contains("upgrade"),
            "{msg}"
        );
    }
    // Refusing changed nothing.
    assert_eq!(
        scalar(&db.url, "SELECT count(*) FROM schema_migrations"),
        i64::from(postgres::SCHEMA_VERSION) + 1
    );
}

#[test]
fn export_from_sqlite_and_import_into_postgres_keeps_the_report() {
    let Some(db) = TestDb::create("export and import") else {
        return;
    };
    let records = fixture(300);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.db");
    write_in_batches(
        &mut SqliteStore::open(&path).expect("sqlite"),
        &records,
        100,
    );
    let conn = sqlite::open_read_only(&path).expect("read");
    let (from, to) = transfer::period_ms(&whole()).expect("period");
    let mut lines = Vec::new();
    assert_eq!(
        transfer::export(&conn, from, to, &mut lines).expect("export"),
        300
    );

    // The budget months are not columns: the importer recomputes them (here as the fixture
    // did), so that the shared budget figures count the imported spend.
    let mut store = PostgresStore::connect(&db.url).expect("postgres");
    let mut annotate = |r: &mut Record| {
        if let Some(p) = &r.project {
            let month: Arc<str> = Arc::from(month_of(r.ts_ms));
            r.budget_months = vec![
                (Arc::from(format!("{p}-monthly")), month.clone()),
                (Arc::from("everything"), month),
            ];
        }
    };
    let n = transfer::import(&mut store, &mut lines.as_slice(), &mut annotate).expect("import");
    assert_eq!(n, 300);
    let pg = PgReader::connect(&db.url).expect("reader");
    let lite = Reader::new(sqlite::open_read_only(&path).expect("read"));
    let span = whole();
    let a = sorted(lite.daily(&span).expect("daily"));
    let b = sorted(pg.daily(&span).expect("daily"));
    assert_eq!(a, b);
    let dims = report::parse_dims("project,tag:team,model").expect("dims");
    assert_eq!(
        report::aggregate(&a, &dims, span),
        report::aggregate(&b, &dims, span)
    );
    let expected = expected_budgets(&records);
    let keys: Vec<(String, String)> = expected.keys().cloned().collect();
    assert_eq!(
        pg.budget_spend(&keys).expect("budgets"),
        expected.values().copied().collect::<Vec<_>>()
    );

    // Out of PostgreSQL: the same lines (the order of calls in the same millisecond aside).
    let mut back = Vec::new();
    transfer::export(&pg, from, to, &mut back).expect("export back");
    let parse = |bytes: &[u8]| {
        let mut rows: Vec<String> = String::from_utf8_lossy(bytes)
            .lines()
            .map(str::to_owned)
            .collect();
        rows.sort();
        rows
    };
    assert_eq!(parse(&lines), parse(&back));
    let row: CallRow = serde_json::from_str(
        String::from_utf8_lossy(&back)
            .lines()
            .next()
            .expect("a line"),
    )
    .expect("json");
    assert!(row.ts_ms >= from);

    // Importing again adds nothing: PostgreSQL skips calls it has.
    transfer::import(&mut store, &mut lines.as_slice(), &mut annotate).expect("import again");
    assert_eq!(pg.count().expect("count"), 300);
    assert_eq!(sorted(pg.daily(&span).expect("daily")), b);

    // A range export: only the calls of one day.
    let (d0, d1) = transfer::period_ms(&period("2026-01-31", "2026-02-01")).expect("period");
    let mut one_day = Vec::new();
    let n = transfer::export(&pg, d0, d1, &mut one_day).expect("export day");
    let want = records
        .iter()
        .filter(|r| (d0..d1).contains(&r.ts_ms))
        .count();
    assert_eq!(usize::try_from(n).expect("n"), want);
}

/// Waits up to `limit` for `cond`, woken by each committed batch (and every 20 ms for
/// conditions a commit does not signal, such as a failed write).
fn wait_for(stats: &LedgerStats, limit: Duration, cond: impl Fn(&LedgerStats) -> bool) -> bool {
    runtime().block_on(async {
        let end = tokio::time::Instant::now() + limit;
        loop {
            let notified = stats.committed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if cond(stats) {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= end {
                return false;
            }
            let tick = (end - now).min(Duration::from_millis(20));
            let _ = tokio::time::timeout(tick, notified).await;
        }
    })
}

fn written(stats: &LedgerStats) -> u64 {
    stats.written.load(std::sync::atomic::Ordering::Acquire)
}

fn now_records(from: u64, n: u64) -> Vec<Record> {
    let now = jiff::Timestamp::now().as_millisecond();
    (from..from + n)
        .map(|i| {
            let mut r = simple(&format!("live_{i}"), "2026-01-01T00:00:00Z");
            r.ts_ms = now;
            r
        })
        .collect()
}

#[test]
fn records_survive_a_broken_connection_and_an_outage() {
    let Some(db) = TestDb::create("reconnect") else {
        return;
    };
    let store = PostgresStore::connect(&db.url).expect("postgres");
    let (ledger, writer) = Ledger::start(Box::new(store), 1000).expect("writer");
    let stats = ledger.stats.clone();

    // Normal operation: committed well within the 1 s promise.
    let started = Instant::now();
    for r in now_records(0, 20) {
        ledger.record(r);
    }
    assert!(wait_for(&stats, Duration::from_secs(1), |s| written(s) == 20));
    assert!(started.elapsed() < Duration::from_secs(1));

    // The server closes the writer's connection: the pool opens another.
    db.terminate_connections();
    for r in now_records(20, 20) {
        ledger.record(r);
    }
    assert!(wait_for(&stats, Duration::from_secs(10), |s| written(s) == 40));

    // An outage: no connection can be made. Records wait in the queue, the writer retries.
    db.allow_connections(false);
    db.terminate_connections();
    let errors_before = stats
        .write_errors
        .load(std::sync::atomic::Ordering::Acquire);
    for r in now_records(40, 30) {
        ledger.record(r);
    }
    assert!(wait_for(&stats, Duration::from_secs(10), |s| {
        s.write_errors.load(std::sync::atomic::Ordering::Acquire) > errors_before
    }));
    assert_eq!(written(&stats), 40);
    assert_eq!(stats.queued.load(std::sync::atomic::Ordering::Acquire), 30);
    db.allow_connections(true);
    // The writer's backoff is at most 5 s between tries.
    assert!(wait_for(&stats, Duration::from_secs(15), |s| written(s) == 70));
    writer.close(&ledger);

    let reader = PgReader::connect(&db.url).expect("reader");
    assert_eq!(reader.count().expect("count"), 70);
    let today = jiff::Timestamp::now()
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .date();
    let span = Period {
        from: today.yesterday().expect("yesterday"),
        to: today.tomorrow().expect("tomorrow"),
    };
    let requests: i64 = reader
        .daily(&span)
        .expect("daily")
        .iter()
        .map(|r| r.requests)
        .sum();
    assert_eq!(requests, 70);
    assert_eq!(stats.dropped.load(std::sync::atomic::Ordering::Acquire), 0);
}

#[test]
fn a_value_postgres_refuses_costs_only_its_own_record() {
    let Some(db) = TestDb::create("poison record") else {
        return;
    };
    let mut store = PostgresStore::connect(&db.url).expect("postgres");
    let mut big = simple("big_1", "2026-01-10T00:00:00Z");
    big.cost_pico = Some(i64::MAX - 10);
    big.model = Some("big-model".to_owned());
    big.budget_months = Vec::new();
    let mut big2 = big.clone();
    big2.request_id = "big_2".to_owned();
    big2.call_id = mantlegate::ledger::new_call_id(big2.ts_ms);
    // Same day and group: the second one's daily sum would pass BIGINT.
    let mut nul = simple("nul", "2026-01-10T00:00:01Z");
    nul.model = Some("gpt\0-x".to_owned());
    let fine = simple("fine", "2026-01-11T00:00:00Z");
    store
        .write_batch(&[big, big2, nul, fine])
        .expect("the batch goes through");
    let reader = PgReader::connect(&db.url).expect("reader");
    assert_eq!(reader.count().expect("count"), 3);
    let models: Vec<String> = reader
        .daily(&period("2026-01-10", "2026-01-12"))
        .expect("daily")
        .into_iter()
        .map(|r| r.model)
        .collect();
    assert!(models.contains(&"gpt-x".to_owned()), "{models:?}");
}

#[tokio::test]
async fn the_reader_can_be_used_and_dropped_inside_a_runtime() {
    // The helpers run their own runtime: keep them on a blocking thread.
    let Some(db) = tokio::task::spawn_blocking(|| TestDb::create("reader in a runtime"))
        .await
        .expect("create db")
    else {
        return;
    };
    // Startup code (budget seeding) calls the blocking reader from async code.
    let mut store = PostgresStore::connect(&db.url).expect("postgres");
    store
        .write_batch(&[simple("one", "2026-01-10T00:00:00Z")])
        .expect("write");
    let reader = PgReader::connect(&db.url).expect("reader");
    assert_eq!(reader.count().expect("count"), 1);
    let spend: HashMap<String, i64> = reader
        .spend_between(0, i64::MAX)
        .expect("spend")
        .into_iter()
        .map(|(p, _, c)| (p, c))
        .collect();
    assert_eq!(spend.len(), 1);
    drop(reader);
    drop(store);
    // The test database is dropped from a blocking thread (the helper runs its own runtime).
    tokio::task::spawn_blocking(move || drop(db))
        .await
        .expect("drop db");
}

#[test]
fn two_replicas_writing_the_same_groups_at_once_count_every_call_once() {
    let Some(db) = TestDb::create("two replicas") else {
        return;
    };
    postgres::migrate(&db.url).expect("migrate");
    let all = fixture(3000);
    let barrier = Arc::new(Barrier::new(2));
    // Each replica writes its own calls, in the same days, groups and budgets as the other.
    let replicas: Vec<_> = [0usize, 1]
        .into_iter()
        .map(|half| {
            let mine: Vec<Record> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 2 == half)
                .map(|(_, r)| r.clone())
                .collect();
            let (url, barrier) = (db.url.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut store = PostgresStore::connect(&url).expect("postgres");
                barrier.wait();
                let mut failures = 0;
                for chunk in mine.chunks(25) {
                    // As the writer thread does: a failed batch is retried whole.
                    while let Err(err) = store.write_batch(chunk) {
                        failures += 1;
                        assert!(failures < 20, "{err:#}");
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<u32> = replicas
        .into_iter()
        .map(|h| h.join().expect("replica"))
        .collect();
    assert_eq!(failures, [0, 0], "no deadlock, no failed batch");
    let pg = PgReader::connect(&db.url).expect("reader");
    assert_eq!(pg.count().expect("count"), 3000);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger.db");
    SqliteStore::open(&path)
        .expect("sqlite")
        .write_batch(&all)
        .expect("write");
    let lite = Reader::new(sqlite::open_read_only(&path).expect("read"));
    assert_eq!(
        sorted(lite.daily(&whole()).expect("daily")),
        sorted(pg.daily(&whole()).expect("daily"))
    );
    let expected = expected_budgets(&all);
    let keys: Vec<(String, String)> = expected.keys().cloned().collect();
    assert_eq!(
        pg.budget_spend(&keys).expect("budgets"),
        expected.values().copied().collect::<Vec<_>>()
    );
}

#[test]
fn a_budget_added_mid_month_is_seeded_from_the_calls_once() {
    let Some(db) = TestDb::create("budget seeding") else {
        return;
    };
    let mut store = PostgresStore::connect(&db.url).expect("postgres");
    // Calls written before the budget existed: no budget months on them.
    let mut before = fixture(200);
    for r in &mut before {
        r.budget_months.clear();
    }
    store.write_batch(&before).expect("write");
    let reader = PgReader::connect(&db.url).expect("reader");
    let january = |name: &str| postgres::BudgetSeed {
        budget: name.to_owned(),
        month: "2026-01".to_owned(),
        start_ms: ms("2026-01-01T00:00:00Z"),
        end_ms: ms("2026-02-01T00:00:00Z"),
        covers: Box::new(|project: &str, tags: &str| {
            project == "search" || tags.contains(r#""team":"ads""#)
        }),
    };
    let want: i64 = before
        .iter()
        .filter(|r| r.ts_ms < ms("2026-02-01T00:00:00Z"))
        .filter(|r| r.project.is_some())
        .filter_map(|r| r.cost_pico)
        .sum();
    assert!(want > 0);
    let seeded = reader
        .fleet()
        .seed_budget_spend(vec![january("new-budget")])
        .expect("seed");
    assert_eq!(seeded, [want]);

    // From now on the writer adds to it; seeding again leaves the row alone.
    let mut after = simple("after_seed", "2026-01-31T12:00:00Z");
    after.budget_months = vec![(Arc::from("new-budget"), Arc::from("2026-01"))];
    let cost = after.cost_pico.expect("priced");
    store.write_batch(&[after]).expect("write");
    let again = reader
        .fleet()
        .seed_budget_spend(vec![january("new-budget"), january("other")])
        .expect("seed again");
    // A budget first seen now is seeded with every call so far, the last one included.
    assert_eq!(again, [want + cost, want + cost]);
    assert_eq!(
        reader
            .budget_spend(&[("new-budget".to_owned(), "2026-01".to_owned())])
            .expect("figure"),
        [want + cost]
    );
}

#[test]
fn a_background_response_settled_by_two_replicas_is_billed_once() {
    let Some(db) = TestDb::create("settle background") else {
        return;
    };
    let mut a = PostgresStore::connect(&db.url).expect("replica a");
    let mut b = PostgresStore::connect(&db.url).expect("replica b");
    let mut created = simple("bg", "2026-01-10T00:00:00Z");
    created.background = Some(Background::Pending);
    created.upstream_response_id = Some("resp_claim".to_owned());
    created.budget_months.clear();
    a.write_batch(&[created]).expect("write");
    let reader = PgReader::connect(&db.url).expect("reader");
    assert!(
        reader
            .fleet()
            .pending_response("resp_claim")
            .expect("read")
            .is_some()
    );
    // Both replicas saw it finished and metered it.
    let settled = |id: &str| {
        let mut r = simple(id, "2026-01-10T00:01:00Z");
        r.background = Some(Background::Settled);
        r.upstream_response_id = Some("resp_claim".to_owned());
        r.usage.input = 1000;
        r.cost_pico = Some(150_000_000);
        r.budget_months = vec![("b".into(), "2026-01".into())];
        r
    };
    b.write_batch(&[settled("get-b")]).expect("write");
    a.write_batch(&[settled("get-a")]).expect("write");
    assert_eq!(
        reader.fleet().pending_response("resp_claim").expect("read"),
        None
    );
    assert_eq!(
        scalar(
            &db.url,
            "SELECT sum(input_tokens)::bigint FROM calls WHERE request_id LIKE 'get-%'"
        ),
        1000,
        "the first settlement bills, the second is recorded at zero"
    );
    assert_eq!(
        scalar(&db.url, "SELECT spent_pico FROM budget_spend"),
        150_000_000
    );
    assert_eq!(
        scalar(&db.url, "SELECT sum(requests)::bigint FROM daily"),
        3,
        "every call is recorded"
    );
}

#[test]
fn replicas_see_each_others_reservations_and_claim_each_alert_once() {
    let Some(db) = TestDb::create("fleet sync") else {
        return;
    };
    drop(PostgresStore::connect(&db.url).expect("migrate"));
    let a = PgFleet::connect(&db.url).expect("replica a");
    let b = PgFleet::connect(&db.url).expect("replica b");
    exec(
        &db.url,
        "INSERT INTO budget_spend (budget, month, spent_pico) VALUES ('b', '2026-11', 500)",
    );
    let mark = |reserved| vec![("b".to_owned(), "2026-11".to_owned(), reserved)];
    assert_eq!(a.sync_fleet("a", mark(70), 0).expect("sync"), [(500, 0)]);
    assert_eq!(b.sync_fleet("b", mark(30), 0).expect("sync"), [(500, 70)]);
    assert_eq!(a.sync_fleet("a", mark(0), 0).expect("sync"), [(500, 30)]);
    // A replica that stopped publishing no longer counts once its row is stale...
    assert_eq!(
        a.sync_fleet("a", mark(0), i64::MAX).expect("sync"),
        [(500, 0)]
    );
    // ...nor after it withdrew.
    b.withdraw_replica("b").expect("withdraw");
    assert_eq!(a.sync_fleet("a", mark(0), 0).expect("sync"), [(500, 0)]);
    // A month nobody spent in reads 0.
    assert_eq!(
        a.sync_fleet("a", vec![("b".into(), "2026-12".into(), 0)], 0)
            .expect("sync"),
        [(0, 0)]
    );
    let alert = || vec![("b".to_owned(), "2026-11".to_owned(), "0.5".to_owned())];
    assert_eq!(a.claim_alerts("a", alert()).expect("claim"), [true]);
    assert_eq!(b.claim_alerts("b", alert()).expect("claim"), [false]);
    assert_eq!(a.claim_alerts("a", alert()).expect("claim"), [false]);
}

#[test]
fn a_claimed_alert_is_queued_once_and_replicas_claiming_the_outbox_at_once_take_turns() {
    use mantlegate::ledger::outbox::{Claim, Entry, Outbox};
    use mantlegate::ledger::postgres::AlertClaim;
    let Some(db) = TestDb::create("webhook outbox") else {
        return;
    };
    drop(PostgresStore::connect(&db.url).expect("migrate"));
    let a = Arc::new(PgFleet::connect(&db.url).expect("replica a"));
    let b = Arc::new(PgFleet::connect(&db.url).expect("replica b"));
    // Both replicas claim the same threshold with their own delivery: one row, the winner's.
    let claim = |id: &str| {
        vec![AlertClaim {
            budget: "b".to_owned(),
            month: "2026-11".to_owned(),
            threshold: "0.5".to_owned(),
            delivery: Some(Entry {
                id: id.to_owned(),
                created_ms: 1_000,
                body: format!(r#"{{"id":"{id}"}}"#),
            }),
        }]
    };
    assert_eq!(
        a.claim_and_queue_alerts("a", claim("mga_a"))
            .expect("claim"),
        [true]
    );
    assert_eq!(
        b.claim_and_queue_alerts("b", claim("mga_b"))
            .expect("claim"),
        [false]
    );
    assert_eq!(scalar(&db.url, "SELECT count(*) FROM webhook_outbox"), 1);
    let more: Vec<Entry> = (0..5)
        .map(|i| Entry {
            id: format!("mga_{i}"),
            created_ms: 2_000 + i,
            body: "{}".to_owned(),
        })
        .collect();
    a.add(&more).expect("add");
    // Rounds of both replicas claiming at the same instant: one gets the row, the other finds
    // the endpoint busy; each row is claimed once, oldest first.
    let mut order = Vec::new();
    for round in 0..6 {
        let now = 10_000 + round * 100;
        let barrier = Arc::new(Barrier::new(2));
        let claims: Vec<Claim> = [("a", a.clone()), ("b", b.clone())]
            .into_iter()
            .map(|(owner, r)| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    r.claim(owner, now, now + 50).expect("claim")
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("join"))
            .collect();
        let rows: Vec<&Entry> = claims
            .iter()
            .filter_map(|c| match c {
                Claim::Row { entry, attempt: 1 } => Some(entry),
                _ => None,
            })
            .collect();
        assert_eq!(rows.len(), 1, "round {round}: {claims:?}");
        assert!(
            claims.contains(&Claim::Busy { until_ms: now + 50 }),
            "round {round}: {claims:?}"
        );
        order.push(rows[0].id.clone());
        a.delivered(&rows[0].id).expect("delivered");
    }
    assert_eq!(
        order,
        ["mga_a", "mga_0", "mga_1", "mga_2", "mga_3", "mga_4"]
    );
    assert_eq!(
        a.claim("a", 20_000, 20_050).expect("claim"),
        Claim::Idle { next_ms: None }
    );
}

#[test]
fn a_shutdown_with_postgres_down_spills_the_records_to_a_file_to_import() {
    let Some(db) = TestDb::create("spill at shutdown") else {
        return;
    };
    let store = PostgresStore::connect(&db.url).expect("postgres");
    let (ledger, writer) = Ledger::start(Box::new(store), 1000).expect("writer");
    db.allow_connections(false);
    db.terminate_connections();
    let records = now_records(0, 25);
    for r in records.clone() {
        ledger.record(r);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = dir.path().join("unwritten.jsonl");
    let started = Instant::now();
    writer.close_within(&ledger, Duration::from_millis(300), spill.clone());
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "shutdown is bounded: {:?}",
        started.elapsed()
    );
    let text = std::fs::read_to_string(&spill).expect("spill file");
    assert_eq!(text.lines().count(), 25, "every record in the file");

    db.allow_connections(true);
    let mut store = PostgresStore::connect(&db.url).expect("postgres");
    let imported = transfer::import(
        &mut store,
        &mut std::io::BufReader::new(text.as_bytes()),
        &mut |_| {},
    )
    .expect("import");
    assert_eq!(imported, 25);
    let reader = PgReader::connect(&db.url).expect("reader");
    assert_eq!(reader.count().expect("count"), 25);
}

/// `(calls, requests in daily, spend of budget "b" in 2026-01)` of a ledger.
fn totals(url: &str) -> (i64, i64, i64) {
    (
        scalar(url, "SELECT count(*) FROM calls"),
        scalar(url, "SELECT COALESCE(sum(requests), 0)::bigint FROM daily"),
        scalar(
            url,
            "SELECT COALESCE(sum(spent_pico), 0)::bigint FROM budget_spend
             WHERE budget = 'b' AND month = '2026-01'",
        ),
    )
}

/// `n` calls that share one request id (a client's, echoed by the upstream) and one
/// millisecond, each priced and counted against budget `b`.
fn same_request_id(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let mut r = simple("client-chosen-id", "2026-01-10T12:00:00Z");
            r.cost_pico = Some(1_000_000 + i64::try_from(i).expect("small"));
            r.budget_months = vec![("b".into(), "2026-01".into())];
            r
        })
        .collect()
}

#[test]
fn calls_sharing_a_request_id_are_all_kept_and_an_import_twice_changes_nothing() {
    let (Some(db), Some(other)) = (
        TestDb::create("shared request id"),
        TestDb::create("shared request id, imported"),
    ) else {
        return;
    };
    let records = same_request_id(40);
    let cost: i64 = records.iter().filter_map(|r| r.cost_pico).sum();
    let mut store = PostgresStore::connect(&db.url).expect("postgres");
    write_in_batches(&mut store, &records, 16);
    assert_eq!(totals(&db.url), (40, 40, cost));
    let ids = scalar(&db.url, "SELECT count(DISTINCT call_id) FROM calls");
    assert_eq!(ids, 40);

    // Exported, each line names its call; imported twice elsewhere, counted once.
    let reader = PgReader::connect(&db.url).expect("reader");
    let mut lines = Vec::new();
    assert_eq!(
        transfer::export(&reader, 0, i64::MAX, &mut lines).expect("export"),
        40
    );
    for (line, r) in String::from_utf8_lossy(&lines).lines().zip({
        let mut sorted = records.clone();
        sorted.sort_by(|a, b| a.call_id.cmp(&b.call_id));
        sorted
    }) {
        let row: CallRow = serde_json::from_str(line).expect("json");
        assert_eq!(row.call_id.as_deref(), Some(r.call_id.as_str()));
    }
    let mut target = PostgresStore::connect(&other.url).expect("postgres");
    let mut annotate = |r: &mut Record| r.budget_months = vec![("b".into(), "2026-01".into())];
    for _ in 0..2 {
        let n =
            transfer::import(&mut target, &mut lines.as_slice(), &mut annotate).expect("import");
        assert_eq!(n, 40);
        assert_eq!(totals(&other.url), (40, 40, cost));
    }
    // And back into the ledger they came from: nothing new there either.
    transfer::import(&mut store, &mut lines.as_slice(), &mut annotate).expect("import back");
    assert_eq!(totals(&db.url), (40, 40, cost));
}

#[test]
fn a_version_2_ledger_migrates_to_call_ids_and_an_old_import_still_finds_its_calls() {
    let Some(db) = TestDb::create("call id migration") else {
        return;
    };
    // The schema as version 2 left it, with a partition and calls in it.
    exec(
        &db.url,
        &format!(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
             {}
             {}
             INSERT INTO schema_migrations (version) VALUES (1), (2);
             CREATE TABLE calls_2026_01 PARTITION OF calls FOR VALUES FROM ({}) TO ({});",
            include_str!("../migrations/postgres/0001_init.sql"),
            include_str!("../migrations/postgres/0002_fleet.sql"),
            ms("2026-01-01T00:00:00Z"),
            ms("2026-02-01T00:00:00Z"),
        ),
    );
    let old: Vec<Record> = ["old_1", "old_2", "old_3"]
        .iter()
        .map(|id| {
            let mut r = simple(id, "2026-01-10T12:00:00Z");
            r.cost_pico = Some(7);
            r
        })
        .collect();
    // As version 2 wrote them (the daily roll-up and budget figures too).
    for r in &old {
        exec(
            &db.url,
            &format!(
                "INSERT INTO calls (ts_ms, request_id, tags, status, outcome, usage_source,
                    duration_ms, cost_pico) VALUES ({}, '{}', '{{}}', 200, 'forwarded',
                    'reported', 1.0, 7);",
                r.ts_ms, r.request_id
            ),
        );
    }
    exec(
        &db.url,
        "INSERT INTO daily VALUES ('2026-01-10', '', '', '', '', '{}', '', '', 'forwarded', 3,
            0, 0, 0, 0, 21, 0);
         INSERT INTO budget_spend VALUES ('b', '2026-01', 21);",
    );
    // Their export, from before call ids.
    let old_lines: String = old
        .iter()
        .map(|r| {
            let mut row = CallRow::from_record(r);
            row.call_id = None;
            row.tags = "{}".to_owned();
            serde_json::to_string(&row).expect("json") + "\n"
        })
        .collect();

    let mut store = PostgresStore::connect(&db.url).expect("migrates");
    assert_eq!(
        scalar(
            &db.url,
            "SELECT max(version)::bigint FROM schema_migrations"
        ),
        i64::from(postgres::SCHEMA_VERSION)
    );
    for r in &old {
        let expected = mantlegate::ledger::legacy_call_id(&r.request_id, r.ts_ms, 0);
        assert_eq!(
            scalar(
                &db.url,
                &format!("SELECT count(*) FROM calls WHERE call_id = '{expected}'")
            ),
            1,
            "{} has its derived call id",
            r.request_id
        );
    }
    // The key is the call id; the request id is a plain column.
    assert_eq!(
        scalar(
            &db.url,
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'calls'::regclass
             AND contype = 'p' AND pg_get_constraintdef(oid) = 'PRIMARY KEY (call_id, ts_ms)'"
        ),
        1
    );
    // The old export again: every call is already there.
    let mut annotate = |r: &mut Record| r.budget_months = vec![("b".into(), "2026-01".into())];
    transfer::import(&mut store, &mut old_lines.as_bytes(), &mut annotate).expect("import");
    assert_eq!(totals(&db.url), (3, 3, 21));
    // New calls are written beside them, one with an old call's request id and time.
    let mut new = same_request_id(2);
    "old_1".clone_into(&mut new[0].request_id);
    new[0].ts_ms = old[0].ts_ms;
    store.write_batch(&new).expect("write after migrating");
    let added: i64 = new.iter().filter_map(|r| r.cost_pico).sum();
    assert_eq!(totals(&db.url), (5, 5, 21 + added));
    let reader = PgReader::connect(&db.url).expect("reader at the new version");
    assert_eq!(reader.count().expect("count"), 5);
}

#[test]
fn a_hostile_import_writes_nothing_and_a_good_one_is_written_once() {
    let Some(db) = TestDb::create("hostile import") else {
        return;
    };
    let mut store = PostgresStore::connect(&db.url).expect("postgres");
    // A month long gone: its partition does not exist, the import creates it.
    let good: Vec<String> = (0..1500)
        .map(|i| {
            let mut r = simple(&format!("req-{i}"), "2025-03-10T12:00:00Z");
            r.cost_pico = Some(4_500_000_000);
            serde_json::to_string(&CallRow::from_record(&r)).expect("json")
        })
        .collect();
    let good = good.join("\n") + "\n";
    let line: serde_json::Value =
        serde_json::from_str(good.lines().next().expect("a line")).expect("json");
    let with = |field: &str, value: serde_json::Value| {
        let mut v = line.clone();
        v[field] = value;
        v["call_id"] = "mg_hostile".into();
        v.to_string()
    };
    let mut annotate = |r: &mut Record| r.budget_months = vec![("b".into(), "2026-01".into())];
    for (bad, says) in [
        (
            with("cost_pico", (-1_000_000_000_000_i64).into()),
            "cost_pico is negative",
        ),
        (
            with("input_tokens", (-1).into()),
            "input_tokens is negative",
        ),
        (
            with("cached_input_tokens", 1_000_000.into()),
            "is more than input_tokens",
        ),
        (
            with("reasoning_tokens", 1_000_000.into()),
            "is more than output_tokens",
        ),
        (
            with("tags", r#"{"Team":["x"]}"#.into()),
            "tags is not a JSON object of strings",
        ),
        (with("extra", 1.into()), "unknown field `extra`"),
        ("{not json".to_owned(), "line 1501: key must be a string"),
    ] {
        let input = format!("{good}{bad}\n");
        let err =
            transfer::import(&mut store, &mut input.as_bytes(), &mut annotate).expect_err(&bad);
        let msg = format!("{err:#}");
        assert!(msg.contains("line 1501: "), "{msg}");
        assert!(msg.contains(says), "{says}: {msg}");
        assert_eq!(totals(&db.url), (0, 0, 0), "nothing written: {bad}");
        assert_eq!(
            scalar(
                &db.url,
                "SELECT count(*) FROM pg_class WHERE relname = 'calls_2025_03'"
            ),
            0,
            "not even the partition"
        );
    }
    let spent = 1500 * 4_500_000_000;
    for _ in 0..2 {
        let n = transfer::import(&mut store, &mut good.as_bytes(), &mut annotate).expect("import");
        assert_eq!(n, 1500);
        assert_eq!(totals(&db.url), (1500, 1500, spent));
    }
}

#[tokio::test]
async fn a_budget_back_after_a_reload_without_it_is_reseeded_from_the_calls() {
    let created = tokio::task::spawn_blocking(|| TestDb::create("budget reseeded by a reload"));
    let Some(db) = created.await.expect("join") else {
        return;
    };
    let url = db.url.clone();
    let (store, reader) = tokio::task::spawn_blocking(move || {
        (
            PostgresStore::connect(&url).expect("postgres"),
            PgReader::connect(&url).expect("reader"),
        )
    })
    .await
    .expect("join");
    let mut store = store;
    let reader = Arc::new(reader);
    let now = jiff::Timestamp::now().as_millisecond();
    let month = mantlegate::budget::Month::containing(now, &jiff::tz::TimeZone::UTC).label();
    let call = |i: usize, named: bool| {
        let mut r = simple(&format!("reseed_{i}"), "2026-01-01T00:00:00Z");
        r.ts_ms = now;
        r.call_id = mantlegate::ledger::new_call_id(now);
        r.project = Some(Arc::from("Chatbot"));
        r.project_id = Some(Arc::from("proj_chat"));
        r.tags = Some(Arc::from("{}"));
        r.cost_pico = Some(1_000_000_000);
        r.budget_months = if named {
            vec![(Arc::from("chatbot-monthly"), Arc::from(month.as_str()))]
        } else {
            Vec::new()
        };
        r
    };
    // Two calls while the budget existed, three while a reload had dropped it.
    let records: Vec<Record> = (0..5).map(|i| call(i, i < 2)).collect();
    let store = tokio::task::spawn_blocking(move || {
        store.write_batch(&records).expect("write");
        store
    })
    .await
    .expect("join");
    drop(store);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mantlegate.toml");
    let text = |budget: &str| {
        format!(
            r#"
[upstream]
base_url = "http://127.0.0.1:9"
[[projects]]
name = "Chatbot"
id = "proj_chat"
[ledger]
url = "{}"
{budget}
"#,
            db.url
        )
    };
    let budget = "[[budgets]]\nname = \"chatbot-monthly\"\nproject = \"Chatbot\"\nmonthly_usd = \"1\"\naction = \"block\"\n";
    std::fs::write(&path, text("")).expect("write");
    let config = mantlegate::config::Config::load(&path).expect("config");
    let snapshot = mantlegate::state::Snapshot::build(&config, None).expect("snapshot");
    let mut state =
        mantlegate::state::AppState::new(snapshot, Duration::from_secs(1)).expect("state");
    state.fleet = Some(Arc::new(reader.fleet()));
    state.reader = Some(reader.clone());
    let reloader = mantlegate::reload::Reloader::new(&path, state.clone());
    std::fs::write(&path, text(budget)).expect("write");
    assert!(reloader.reload("test"));
    let status = &state.snapshot.load().budgets.statuses(now)[0];
    // Five calls of $0.001: the month's calls the budget covers, not its stale row's two.
    assert_eq!(status.spend_usd, "0.005");
    let reader2 = reader.clone();
    let row = tokio::task::spawn_blocking(move || {
        reader2
            .budget_spend(&[("chatbot-monthly".to_owned(), month)])
            .expect("figure")
    })
    .await
    .expect("join");
    assert_eq!(row, [5_000_000_000], "the fleet's row is corrected too");
}
