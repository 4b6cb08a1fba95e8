//! How many ledger records per second the SQLite writer sustains, through the same `Ledger`
//! queue and writer thread the proxy uses.
//!
//! ```text
//! ledger-bench --db PATH [--records 200000]          # burst: queue them all, time the writes
//! ledger-bench --db PATH --rate 40000 --seconds 10   # paced: offer a steady rate, watch the queue
//! ```
//! Burst mode builds the records first, queues them as fast as `Ledger::record` takes them
//! (the queue holds them all, so none is dropped) and reports records committed per second.
//! Paced mode offers `--rate` records per second, as the proxy would at that rate, and
//! reports the deepest the queue got: a writer that keeps up stays near one batch.
//! Half the records are Responses calls carrying a response id (an indexed column), scattered
//! as real ids are.
//! Prints one line of `name=value` figures, prefixed `ledger-bench:`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use mantlegate::ledger::LedgerRead;
use mantlegate::ledger::sqlite::{self, Reader, SqliteStore};
use mantlegate::ledger::{Ledger, LedgerStats, Record};
use mantlegate::meter::{Usage, UsageSource};

const USAGE: &str = "usage: ledger-bench --db PATH [--records N] [--rate R --seconds S]";

struct Args {
    db: PathBuf,
    records: u64,
    rate: Option<u64>,
    seconds: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        db: PathBuf::new(),
        records: 200_000,
        rate: None,
        seconds: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--db" => args.db = value()?.into(),
            "--records" => args.records = value()?.parse().context("--records")?,
            "--rate" => args.rate = Some(value()?.parse().context("--rate")?),
            "--seconds" => args.seconds = value()?.parse().context("--seconds")?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other}; {USAGE}"),
        }
    }
    anyhow::ensure!(
        !args.db.as_os_str().is_empty(),
        "--db PATH is required (a new file)"
    );
    Ok(args)
}

/// The dimensions of the records: a few keys and projects, as a real ledger has.
struct Dims {
    keys: Vec<Arc<str>>,
    projects: Vec<(Arc<str>, Arc<str>, Arc<str>)>,
    now_ms: i64,
}

impl Dims {
    fn new() -> Self {
        let projects = [
            ("CustomerChatbot-Prod", "proj_bench1", "CustomerChatbot"),
            ("DocSearch-Dev", "proj_bench2", "DocSearch"),
            ("Shared-Unattributed", "proj_bench3", "Unattributed"),
        ]
        .into_iter()
        .map(|(name, id, app)| {
            let tags = format!(
                r#"{{"Application":"{app}","CostCenter":"CC-1001","Environment":"Production","Owner":"alice","Team":"Platform"}}"#
            );
            (Arc::from(name), Arc::from(id), Arc::from(tags.as_str()))
        })
        .collect();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
        Self {
            keys: vec![
                Arc::from("chatbot-backend"),
                Arc::from("search-team"),
                Arc::from("batch-jobs"),
            ],
            projects,
            now_ms,
        }
    }

    /// The `n`th record: what one forwarded call leaves in the ledger.
    fn record(&self, n: u64) -> Record {
        let i = usize::try_from(n % 3).unwrap_or(0);
        let responses = n % 2 == 1;
        let (project, project_id, tags) = &self.projects[i];
        let ts_ms = self.now_ms + i64::try_from(n / 64).unwrap_or(0);
        Record {
            call_id: mantlegate::ledger::new_call_id(ts_ms),
            ts_ms,
            request_id: format!("req_{n:024x}"),
            key: Some(self.keys[i].clone()),
            key_fp: None,
            budget_months: Vec::new(),
            route: None,
            project: Some(project.clone()),
            project_id: Some(project_id.clone()),
            tags: Some(tags.clone()),
            api: Some(if responses {
                "responses"
            } else {
                "chat.completions"
            }),
            model: Some("openai.gpt-oss-120b".to_owned()),
            stream: n % 4 < 2,
            status: 200,
            outcome: "forwarded",
            error_code: None,
            usage: Usage {
                input: 87 + n % 100,
                cached_input: 0,
                output: 143,
                reasoning: 61,
            },
            usage_source: UsageSource::Reported,
            cost_pico: Some(98_850_000 + i64::try_from(n % 100).unwrap_or(0) * 150_000),
            duration_ms: 412.5,
            ttfb_ms: Some(180.25),
            upstream_response_id: responses.then(|| response_id(n)),
            background: None,
        }
    }
}

/// The `n`th response id: `resp_` and 48 hex digits, scattered as real ids are (OpenAI's are
/// random), so that the index on them is written where random ids land, not appended to.
fn response_id(n: u64) -> String {
    let a = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let b = a.rotate_left(29) ^ n;
    format!("resp_{a:016x}{b:016x}{n:016x}")
}

/// User + system CPU time of this process, from /proc (Linux).
fn cpu_time() -> Option<Duration> {
    stat_cpu_time("/proc/self/stat")
}

/// User + system CPU time of the writer thread alone (the thread named `ledger-writer`): the
/// process's time also holds the records being made and, in paced mode, the pacing's sleeps
/// and wake-ups, which the proxy does not pay for its ledger.
fn writer_cpu_time() -> Option<Duration> {
    std::fs::read_dir("/proc/self/task").ok()?.find_map(|task| {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        (comm.trim_end() == mantlegate::ledger::WRITER_THREAD)
            .then(|| stat_cpu_time(dir.join("stat")))
            .flatten()
    })
}

/// utime + stime from a `/proc/.../stat` file.
fn stat_cpu_time(path: impl AsRef<std::path::Path>) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command name: state is field 3 of the file, utime 14, stime 15.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(Duration::from_millis(ticks * 10))
}

/// Waits until `target` records are committed, tracking the deepest queue seen.
fn wait_written(stats: &LedgerStats, target: u64, max_queue: &mut u64) {
    while stats.written.load(Ordering::Relaxed) < target {
        *max_queue = (*max_queue).max(stats.queued.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "record counts far below 2^52, printed as rates"
)]
fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    anyhow::ensure!(
        !args.db.exists(),
        "{} exists: give a new file, so that figures start from an empty ledger",
        args.db.display()
    );
    let dims = Dims::new();
    let store = SqliteStore::open(&args.db)
        .with_context(|| format!("cannot open {}", args.db.display()))?;

    let mut max_queue = 0u64;
    let writer_cpu;
    let cpu0 = cpu_time();
    let (mode, total, elapsed) = if let Some(rate) = args.rate {
        let total = rate * args.seconds;
        // Room for the whole run: a writer that falls behind shows as depth, not drops.
        let capacity = usize::try_from(total).unwrap_or(usize::MAX).max(1);
        let (ledger, writer) = Ledger::start(Box::new(store), capacity)?;
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < total {
            let due = u64::try_from(start.elapsed().as_micros() * u128::from(rate) / 1_000_000)
                .unwrap_or(u64::MAX);
            while sent < due.min(total) {
                ledger.record(dims.record(sent));
                sent += 1;
            }
            max_queue = max_queue.max(ledger.stats.queued.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_micros(500));
        }
        wait_written(&ledger.stats, total, &mut max_queue);
        let elapsed = start.elapsed();
        writer_cpu = writer_cpu_time();
        report_dropped(&ledger)?;
        writer.close(&ledger);
        ("paced", total, elapsed)
    } else {
        let total = args.records;
        let records: Vec<Record> = (0..total).map(|n| dims.record(n)).collect();
        let capacity = usize::try_from(total).unwrap_or(usize::MAX).max(1);
        let (ledger, writer) = Ledger::start(Box::new(store), capacity)?;
        let start = Instant::now();
        for r in records {
            ledger.record(r);
        }
        let queued_in = start.elapsed();
        max_queue = ledger.stats.queued.load(Ordering::Relaxed);
        wait_written(&ledger.stats, total, &mut max_queue);
        let elapsed = start.elapsed();
        writer_cpu = writer_cpu_time();
        eprintln!(
            "queued {total} records in {:.3} s, all written after {:.3} s",
            queued_in.as_secs_f64(),
            elapsed.as_secs_f64()
        );
        report_dropped(&ledger)?;
        writer.close(&ledger);
        ("burst", total, elapsed)
    };
    let cpu = cpu0.zip(cpu_time()).map(|(a, b)| b.saturating_sub(a));
    let rows = Reader::new(sqlite::open_read_only(&args.db)?).count()?;
    anyhow::ensure!(
        u64::try_from(rows).ok() == Some(total),
        "{rows} rows in the ledger for {total} records"
    );
    let db_bytes = std::fs::metadata(&args.db).map_or(0, |m| m.len());
    println!(
        "ledger-bench: mode={mode} records={total} elapsed_s={:.3} records_per_s={:.0} max_queue_depth={max_queue} cpu_us_per_record={} writer_cpu_us_per_record={} rows={rows} db_bytes={db_bytes}",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        per_record(cpu, total),
        per_record(writer_cpu, total),
    );
    Ok(())
}

#[expect(
    clippy::cast_precision_loss,
    reason = "record counts far below 2^52, printed as rates"
)]
fn per_record(cpu: Option<Duration>, records: u64) -> String {
    cpu.map_or_else(
        || "n/a".to_owned(),
        |c| format!("{:.2}", c.as_secs_f64() * 1e6 / records as f64),
    )
}

fn report_dropped(ledger: &Ledger) -> anyhow::Result<()> {
    let dropped = ledger.stats.dropped.load(Ordering::Relaxed);
    anyhow::ensure!(dropped == 0, "{dropped} records dropped");
    Ok(())
}
