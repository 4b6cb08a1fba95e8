//! The shared `PostgreSQL` ledger: month-partitioned calls, per-day roll-ups and budget spend
//! written in idempotent batches, versioned migrations, retention by dropping partitions.
//!
//! By concern: [`schema`] (migrations and partitions), [`writer`] (the writer thread's
//! [`PostgresStore`]), [`reader`] (the read-only [`PgReader`]), [`fleet`] (what replicas share
//! beside the ledger: budget figures, reservations and alerts, pending background responses,
//! the webhook outbox; [`PgFleet`]) and [`retention`] (dropping old partitions).

mod fleet;
mod reader;
mod retention;
mod schema;
mod writer;

pub use fleet::{AlertClaim, BudgetSeed, Covers, PgFleet};
pub use reader::PgReader;
pub use schema::{SCHEMA_VERSION, migrate};
pub use writer::PostgresStore;

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use tokio_postgres::NoTls;
use tokio_postgres::config::SslMode;

/// Connecting, or waiting for a pooled connection, longer than this is an error (and a retry).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One read (a report, a lookup) longer than this is an error.
const READ_TIMEOUT: Duration = Duration::from_mins(2);
/// One lookup a call waits on (who owns a stored response) longer than this is an error.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Partition DDL waits at most this long for the lock on `calls`: a pending `ACCESS
/// EXCLUSIVE` request queues every later insert behind it, so it must not wait long.
const DDL_LOCK_TIMEOUT: &str = "5s";

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

/// `PostgreSQL` text cannot hold NUL: a model name from a request body could, and a batch that
/// can never be written would stall the ledger. Such characters are dropped.
fn text(s: &str) -> String {
    s.replace('\0', "")
}

fn opt_text(s: Option<&str>) -> Option<String> {
    s.map(text)
}

/// A driver thread and its pool: what a [`PgReader`] and the [`PgFleet`] made from it share.
struct Db {
    driver: Driver,
    pool: Pool,
}

impl Db {
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
}

#[cfg(test)]
mod tests {
    use super::schema::{MIGRATIONS, SCHEMA_VERSION};
    use super::{MonthKey, text};

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
