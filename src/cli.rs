//! Command line: serve, check, keys, demo, simulate, health, and the ledger and projects tools.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::ledger::postgres::{PgFleet, PgReader, PostgresStore};
use crate::ledger::sqlite::{self, Reader, SqliteStore};
use crate::ledger::{Ledger, LedgerRead, Store, transfer};
use crate::secret::Secret;
use crate::state::{AppState, Snapshot};

/// The attribution-enforcing reverse proxy for Amazon Bedrock (bedrock-mantle).
#[derive(Debug, Parser)]
#[command(name = "mantlegate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Listen address, overriding `server.listen` (port 0 picks a free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Cost report from the ledger, grouped by any dimensions.
    Report {
        /// Configuration file (TOML); its `[ledger]` is read.
        #[arg(long)]
        config: PathBuf,
        /// First UTC day, YYYY-MM-DD (default: the first of this month).
        #[arg(long)]
        from: Option<String>,
        /// Day after the last, YYYY-MM-DD, exclusive (default: tomorrow).
        #[arg(long)]
        to: Option<String>,
        /// Comma-separated: project, model, key, route, api, day, month, outcome, tag:NAME.
        #[arg(long, default_value = "project")]
        group_by: String,
        /// table, csv, json or focus (FinOps FOCUS CSV).
        #[arg(long, default_value = "table")]
        format: String,
        /// SQLite ledger file to read instead of the config's `[ledger]`.
        #[arg(long)]
        ledger: Option<PathBuf>,
    },
    /// Budgets: limit, month-to-date spend, percentage and month-end forecast, from the ledger.
    Budgets {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// SQLite ledger file to read instead of the config's `[ledger]`.
        #[arg(long)]
        ledger: Option<PathBuf>,
    },
    /// Apply the ledger's schema migrations (`serve` applies them too).
    Migrate {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Move ledger records between SQLite and PostgreSQL.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Validate a configuration: print a summary, or every problem and exit non-zero.
    Check {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Manage caller keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The proxy on 127.0.0.1:8080 in front of a built-in simulated bedrock-mantle.
    Demo {
        /// Listen address of the proxy.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Projects as code: compare `[[projects]]` with the account's Bedrock projects and apply.
    Projects {
        #[command(subcommand)]
        command: ProjectsCommand,
    },
    /// Probe a running proxy's health endpoint: exit 0 when it answers 2xx, else 1 and why
    /// (the container image's health check; the image has no curl).
    Health {
        /// The endpoint, plain HTTP: `/readyz` (config loaded, upstream credentials present)
        /// or `/healthz` (the process answers).
        #[arg(long, default_value = crate::health::DEFAULT_URL)]
        url: String,
        /// How long to wait for the answer, e.g. `3s`, `500ms`.
        #[arg(long, default_value = "3s", value_parser = humantime_serde::re::humantime::parse_duration)]
        timeout: Duration,
    },
    /// Only the simulated bedrock-mantle (for trying configurations and for tests).
    Simulate {
        /// Listen address (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Delay between streamed events, in milliseconds.
        #[arg(long, default_value_t = 30)]
        event_delay_ms: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ProjectsCommand {
    /// Print what `apply` would do: creates, tag changes, archives, unmanaged projects.
    Plan {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Archive active projects that no `[[projects]]` entry names (never `default`).
        #[arg(long)]
        archive_missing: bool,
    },
    /// Do it, then write the ids of new projects into the config file.
    Apply {
        /// Configuration file (TOML); rewritten in place, comments and layout kept.
        #[arg(long)]
        config: PathBuf,
        /// Archive active projects that no `[[projects]]` entry names (never `default`).
        #[arg(long)]
        archive_missing: bool,
    },
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Write the calls of a period to stdout as JSON lines (one call per line, every column).
    Export {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// First UTC day, YYYY-MM-DD (default: the first of this month).
        #[arg(long)]
        from: Option<String>,
        /// Day after the last, YYYY-MM-DD, exclusive (default: tomorrow).
        #[arg(long)]
        to: Option<String>,
    },
    /// Read JSON lines written by `ledger export` (stdin, or --input FILE) into the
    /// configured ledger.
    Import {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// File to read (default: stdin).
        #[arg(long)]
        input: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// List the configured keys: name, projects, expiry, state and last use (from the ledger).
    List {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Mint a fresh random key: print it once, with the `[[keys]]` block (its SHA-256) for
    /// the config, or (--write) add that block to the config file.
    New {
        /// Configuration file (TOML): each --project must be one of its `[[projects]]`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Name of the key in logs and reports.
        #[arg(long, default_value = "new-key")]
        name: String,
        /// Project the key may use (repeat; the first is its default).
        #[arg(long = "project")]
        projects: Vec<String>,
        /// Add the `[[keys]]` entry to the --config file, comments and layout kept.
        #[arg(long, requires = "config")]
        write: bool,
    },
}

/// Parses arguments and runs the command.
#[must_use]
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log_flush = init_tracing();
    let result = match cli.command {
        Command::Serve { config, listen } => {
            runtime().and_then(|rt| rt.block_on(serve(&config, listen)))
        }
        Command::Check { config } => return check(&config),
        Command::Budgets { config, ledger } => budgets(&config, ledger.as_deref()),
        Command::Migrate { config } => migrate(&config),
        Command::Ledger {
            command: LedgerCommand::Export { config, from, to },
        } => ledger_export(&config, from.as_deref(), to.as_deref()),
        Command::Ledger {
            command: LedgerCommand::Import { config, input },
        } => ledger_import(&config, input.as_deref()),
        Command::Report {
            config,
            from,
            to,
            group_by,
            format,
            ledger,
        } => report(
            &config,
            ledger.as_deref(),
            from.as_deref(),
            to.as_deref(),
            &group_by,
            &format,
        ),
        Command::Keys {
            command:
                KeysCommand::New {
                    config,
                    name,
                    projects,
                    write,
                },
        } => keys_new(config.as_deref(), &name, &projects, write),
        Command::Keys {
            command: KeysCommand::List { config },
        } => keys_list(&config),
        Command::Projects { command } => runtime().and_then(|rt| rt.block_on(projects(command))),
        Command::Demo { listen } => runtime().and_then(|rt| rt.block_on(demo(listen))),
        Command::Health { url, timeout } => crate::health::probe(&url, timeout)
            .map(|ok| println!("{} {}", ok.status, ok.body))
            .map_err(anyhow::Error::from),
        Command::Simulate {
            listen,
            event_delay_ms,
        } => runtime().and_then(|rt| rt.block_on(simulate(listen, event_delay_ms))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `mantlegate projects plan|apply`.
async fn projects(command: ProjectsCommand) -> anyhow::Result<()> {
    match command {
        ProjectsCommand::Plan {
            config,
            archive_missing,
        } => crate::projects::plan_command(&config, archive_missing).await,
        ProjectsCommand::Apply {
            config,
            archive_missing,
        } => crate::projects::apply_command(&config, archive_missing).await,
    }
}

/// The async runtime: one worker thread per core mantlegate may use. On one core (a process
/// pinned to it, or a container limited to one CPU: the standard library reads the cgroup
/// quota) it is tokio's single-threaded runtime, which drives every task on the main thread;
/// the work-stealing scheduler buys nothing there and costs atomics and cross-thread wakeups.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let one_core = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let mut builder = if one_core {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// JSON lines on stdout; level from `MANTLEGATE_LOG` (default `info`), written in batches by
/// a background thread ([`crate::logging`]). The returned guard flushes what is buffered when
/// dropped, at exit.
fn init_tracing() -> Option<crate::logging::LogGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MANTLEGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter);
    if let Ok((writer, guard)) = crate::logging::batched(std::io::stdout()) {
        let access = writer.clone();
        crate::logging::set_access_sink(Box::new(move |line| access.write_line(line)));
        builder.with_writer(writer).init();
        Some(guard)
    } else {
        // No thread for the flusher: write each line directly.
        crate::logging::set_access_sink(Box::new(|line| {
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), line);
        }));
        builder.with_writer(std::io::stdout).init();
        None
    }
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

async fn serve(path: &Path, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let config = load(path)?;
    let upstream_key = crate::reload::upstream_key(&config)?;
    if upstream_key.is_none() && config.upstream.auth == crate::config::UpstreamAuth::ApiKey {
        tracing::error!(
            env = %config.upstream.api_key_env,
            "no upstream API key (upstream.api_key_env / api_key_file): calls will fail with upstream_key_missing and /readyz reports not ready"
        );
    }
    let addr = match listen {
        Some(a) => a,
        None => config.server.listen.parse()?,
    };
    let mut snapshot = Snapshot::build(&config, upstream_key.as_deref())?;
    if let Some(url) = &config.limits.store {
        use crate::ratelimit::redis::{RedisBackend, RedisOptions};
        let options = RedisOptions {
            timeout: config.limits.store_timeout,
            ..RedisOptions::default()
        };
        let store = RedisBackend::connect(url, options)
            .map_err(|e| anyhow::anyhow!("limits.store: {e}"))?;
        match store.ping().await {
            Ok(()) => tracing::info!(store = %store.url(), "rate limits shared across replicas"),
            // Fail open: serve with per-replica limits until Redis answers.
            Err(error) => {
                tracing::error!(store = %store.url(), %error, "rate-limit store unreachable at start: rate limits hold per replica until it answers");
            }
        }
        snapshot.share_rate_limits(&store);
    }
    let token = admin_token(&config);
    if let Some(var) = &config.metrics.token_env
        && snapshot.metrics_token_sha256.is_none()
    {
        tracing::warn!(env = %var, "metrics token variable is not set: /metrics on the main listener takes the admin token only");
    }
    run(addr, snapshot, &config, token, Some(path)).await
}

/// Every connection is a descriptor: takes all the system grants before the connection table
/// is sized from it, and says what that allows.
fn raise_fd_limit(config: &Config) {
    if let Some(open_files) = crate::server::raise_fd_limit() {
        let derived = crate::server::derived_max_connections(open_files);
        match config.server.max_connections {
            Some(max) if max > derived => tracing::warn!(
                max_connections = max,
                open_files,
                "server.max_connections leaves too few file descriptors for upstream connections and the ledger: at {derived} or fewer, a full table closes idle connections instead of failing accepts"
            ),
            max => tracing::info!(
                open_files,
                max_connections = max.unwrap_or(derived),
                "connection limit"
            ),
        }
    }
}

/// Admin token from `[admin] token_env`, when set and present.
fn admin_token(config: &Config) -> Option<String> {
    let var = config.admin.token_env.as_ref()?;
    match std::env::var(var) {
        Ok(token) if !token.is_empty() => Some(token),
        _ => {
            tracing::warn!(env = %var, "admin token variable is not set: the admin API is off");
            None
        }
    }
}

async fn run(
    addr: SocketAddr,
    snapshot: Snapshot,
    config: &Config,
    admin_token: Option<String>,
    config_path: Option<&Path>,
) -> anyhow::Result<()> {
    tracing::info!(
        projects = snapshot.projects.len(),
        keys = snapshot.key_count,
        routes = snapshot.routes.len(),
        prices = snapshot.prices.len(),
        upstream = %snapshot.upstream.base,
        "config loaded"
    );
    let mut state = AppState::new(snapshot, config.upstream.connect_timeout)?;
    if config.upstream.auth == crate::config::UpstreamAuth::Sigv4 {
        let region = config
            .upstream
            .signing_region()
            .context("upstream.region is required with auth = \"sigv4\"")?;
        let signer = crate::sigv4::Signer::from_environment(region).await?;
        // A missing credential source shows now, not on the first call; the chain may still
        // provide credentials later (e.g. the instance metadata service not up yet).
        if let Err(err) = signer.preload().await {
            tracing::error!(
                error = format!("{err:#}"),
                "no AWS credentials yet: calls fail with upstream_credentials_unavailable and /readyz reports not ready until the AWS chain provides some"
            );
        }
        state.signer = Some(signer);
    }
    let (store, reader, pg) = open_ledger(config)?;
    state.responses.seed_from_ledger(&*reader)?;
    match &pg {
        // The fleet's shared month-to-date figures, seeded from the calls where missing.
        Some(pg) => state.snapshot.load().budgets.seed_from_fleet(None, pg)?,
        None => state.snapshot.load().budgets.seed_from_ledger(&*reader)?,
    }
    if let (Some(months), Some(pg)) = (config.ledger.retention_months, pg.clone()) {
        tokio::spawn(retention(pg, months));
    }
    let ledger_path = config
        .ledger
        .url
        .as_ref()
        .map_or_else(|| config.ledger.path.clone(), |_| "postgresql".to_owned());
    let (ledger, writer) = start_writer(store, &state, config.ledger.queue_capacity)?;
    state.ledger = Some(ledger.clone());
    state.outbox = match &pg {
        Some(pg) => pg.clone(),
        None => Arc::new(
            sqlite::SqliteOutbox::open(Path::new(&config.ledger.path))
                .context("cannot open the webhook outbox of the ledger")?,
        ),
    };
    let replica = replica_id();
    if let Some(pg) = &pg {
        state.fleet = Some(pg.clone());
        tracing::info!(replica = %replica, every = ?config.ledger.budget_refresh, "budgets shared with the fleet through the postgresql ledger");
        tokio::spawn(fleet_refresh(
            state.clone(),
            pg.clone(),
            replica.clone(),
            config.ledger.budget_refresh,
        ));
    }
    state.reader = Some(reader);
    state.admin_token = admin_token.map(|t| Arc::new(Secret::new(t)));
    tracing::info!(ledger = %ledger_path, "ledger open");
    if let Some(path) = config_path {
        let reloader = Arc::new(crate::reload::Reloader::new(path, state.clone()));
        tokio::spawn(reloader.watch(Duration::from_secs(2)));
    }
    if let Some(metrics_addr) = &config.server.metrics_listen {
        let metrics_listener = TcpListener::bind(metrics_addr.as_str())
            .await
            .with_context(|| format!("cannot listen on {metrics_addr} for metrics"))?;
        tracing::info!(addr = %metrics_listener.local_addr()?, "metrics listening");
        let app = crate::metrics_router(state.clone());
        tokio::spawn(async move { axum::serve(metrics_listener, app).await });
    }
    raise_fd_limit(config);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "listening");
    crate::serve(
        listener,
        state,
        shutdown_signal(),
        config.server.drain_timeout,
    )
    .await?;
    // Every call that finished has queued its record: write them all before exiting (or,
    // with the ledger unreachable past the drain timeout, into a file to import later).
    writer.close_within(&ledger, config.server.drain_timeout, spill_path(config));
    if let Some(pg) = &pg
        && let Err(err) = pg.withdraw_replica(&replica)
    {
        tracing::warn!(error = %format!("{err:#}"), "could not withdraw this replica's budget reservations; they expire on their own");
    }
    tracing::info!("stopped");
    Ok(())
}

/// The config at `path`, reading the SQLite ledger `ledger` when given.
fn load_reading(path: &Path, ledger: Option<&Path>) -> anyhow::Result<Config> {
    let mut config = load(path)?;
    if let Some(file) = ledger {
        config.ledger.url = None;
        config.ledger.path = file.display().to_string();
    }
    Ok(config)
}

fn budgets(path: &Path, ledger: Option<&Path>) -> anyhow::Result<()> {
    let config = load_reading(path, ledger)?;
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let budgets = crate::budget::Budgets::from_config(&config, now_ms)?;
    let reader = open_reader(&config)?;
    budgets.seed_from_ledger(&*reader)?;
    println!(
        "{:<24} {:<8} {:<8} {:>14} {:>14} {:>8} {:>14}  scope",
        "budget", "action", "month", "limit_usd", "spend_usd", "percent", "forecast_usd"
    );
    for s in budgets.statuses(now_ms) {
        println!(
            "{:<24} {:<8} {:<8} {:>14} {:>14} {:>7}% {:>14}  {} ({})",
            s.name,
            s.action,
            s.month,
            s.limit_usd,
            s.spend_usd,
            s.percent,
            s.forecast_usd,
            s.scope,
            s.timezone
        );
    }
    println!("forecast: {}", crate::budget::FORECAST_METHOD);
    println!("in-flight reservations live in the running proxy: GET /admin/v1/budgets");
    Ok(())
}

fn report(
    path: &Path,
    ledger: Option<&Path>,
    from: Option<&str>,
    to: Option<&str>,
    group_by: &str,
    format: &str,
) -> anyhow::Result<()> {
    let config = load_reading(path, ledger)?;
    let format: crate::report::Format = format.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    crate::report::check_dim_count(group_by)?;
    let dims = crate::report::parse_dims(group_by).map_err(|e| anyhow::anyhow!(e))?;
    let today = jiff::Timestamp::now()
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .date();
    let period = crate::report::period(from, to, today).map_err(|e| anyhow::anyhow!(e))?;
    let rows = open_reader(&config)?.daily(&period)?;
    warn_unknown_tags(&config, &rows, &dims);
    let report = crate::report::aggregate_within(&rows, &dims, period, crate::report::MAX_GROUPS)?;
    print!("{}", crate::report::render(&report, format));
    Ok(())
}

/// Warns on stderr of each `tag:NAME` dim that neither a configured project nor any call of
/// the period carries: every row would be under `(none)`, most likely for a typo (tag keys
/// are case-sensitive). Names the tags there are, and the nearest one.
fn warn_unknown_tags(
    config: &Config,
    rows: &[crate::report::DailyRow],
    dims: &[crate::report::Dim],
) {
    let mut known = crate::report::tag_keys(rows);
    for p in &config.projects {
        known.extend(p.tags.keys().cloned());
    }
    for dim in dims {
        let crate::report::Dim::Tag(tag) = dim else {
            continue;
        };
        if known.contains(tag) {
            continue;
        }
        let there = if known.is_empty() {
            "no project has any tag".to_owned()
        } else {
            format!(
                "the tags there are: {}",
                known
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let hint = crate::config::closest(tag, known.iter().map(String::as_str))
            .map_or_else(String::new, |c| {
                format!("; did you mean --group-by tag:{c}?")
            });
        eprintln!(
            "warning: no project and no call of this period has the tag `{tag}` (tag keys are case-sensitive), so every row is under (none) for tag:{tag}; {there}{hint}"
        );
    }
}

/// The writer's store and a reader of the configured ledger (and the `PostgreSQL` fleet
/// handle for the fleet-only jobs: retention, shared budget figures).
fn open_ledger(config: &Config) -> anyhow::Result<OpenLedger> {
    if let Some(url) = &config.ledger.url {
        // Applies pending migrations under an advisory lock; refuses a newer schema.
        let store = PostgresStore::connect(url.expose())
            .context("cannot open the postgresql ledger")?
            .with_max_models_per_day(config.ledger.max_models_per_day);
        let reader =
            Arc::new(PgReader::connect(url.expose()).context("cannot read the postgresql ledger")?);
        let fleet = Arc::new(reader.fleet());
        Ok((Box::new(store), reader, Some(fleet)))
    } else {
        let path = Path::new(&config.ledger.path);
        let store = SqliteStore::open(path)
            .with_context(|| format!("cannot open the ledger {}", path.display()))?
            .with_max_models_per_day(config.ledger.max_models_per_day);
        Ok((
            Box::new(store),
            Arc::new(Reader::new(sqlite::open_read_only(path)?)),
            None,
        ))
    }
}

/// The writer's store, a reader, and the `PostgreSQL` fleet handle when there is one.
type OpenLedger = (Box<dyn Store>, Arc<dyn LedgerRead>, Option<Arc<PgFleet>>);

/// A reader only (report, budgets, keys list): never migrates.
fn open_reader(config: &Config) -> anyhow::Result<Arc<dyn LedgerRead>> {
    if let Some(url) = &config.ledger.url {
        return Ok(Arc::new(PgReader::connect(url.expose())?));
    }
    let path = Path::new(&config.ledger.path);
    if !path.exists() {
        anyhow::bail!(
            "{}, or pass --ledger FILE to read another",
            no_ledger_yet(path)
        );
    }
    Ok(Arc::new(Reader::new(
        sqlite::open_read_only(path)
            .with_context(|| format!("cannot read the ledger {}", path.display()))?,
    )))
}

/// What to do when the SQLite ledger a command reads is not there: it is made by the first
/// `serve` (or `demo`) and a relative path is read from the working directory.
fn no_ledger_yet(path: &Path) -> String {
    let relative = if path.is_relative() {
        " (relative to the working directory)"
    } else {
        ""
    };
    format!(
        "no ledger at {}{relative} yet: start `mantlegate serve` (or `mantlegate demo`) to create it",
        path.display()
    )
}

/// Where records the ledger could not take at shutdown go: beside the SQLite file (the
/// working directory by default).
fn spill_path(config: &Config) -> PathBuf {
    Path::new(&config.ledger.path)
        .parent()
        .unwrap_or_else(|| Path::new(""))
        .join(format!(
            "mantlegate-unwritten-{}.jsonl",
            jiff::Timestamp::now().as_millisecond()
        ))
}

/// Starts the ledger writer; each committed batch's spend stops counting as this replica's
/// uncommitted own spend in the budgets.
fn start_writer(
    store: Box<dyn Store>,
    state: &AppState,
    capacity: usize,
) -> anyhow::Result<(Ledger, crate::ledger::LedgerWriter)> {
    let snapshot = state.snapshot.clone();
    Ledger::start_with(
        store,
        capacity,
        Box::new(move |batch| {
            let snap = snapshot.load();
            if !snap.budgets.list.is_empty() {
                snap.budgets.committed(batch.iter().flat_map(|r| {
                    let cost = r.cost_pico.unwrap_or(0).max(0);
                    r.budget_months
                        .iter()
                        .filter(move |_| cost > 0)
                        .map(move |(b, m)| (&**b, &**m, cost))
                }));
            }
        }),
    )
}

/// A name for this process among the fleet's replicas: host, process id and a random part
/// (a restarted replica is a new one; its predecessor's rows expire).
fn replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    format!(
        "{}-{}-{:08x}",
        if host.is_empty() { "mantlegate" } else { &host },
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Keeps this replica's budgets in step with the fleet: every `every`, publishes its own
/// reservations and takes in the fleet's committed spend and the other replicas'
/// reservations, then announces the thresholds it is first to claim.
async fn fleet_refresh(state: AppState, pg: Arc<PgFleet>, replica: String, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Reservations of a replica that stopped publishing (killed) stop counting after this.
    let stale_after = (every * 5).max(Duration::from_secs(3));
    let mut seeded: std::collections::HashSet<(String, String)> = std::collections::HashSet::new();
    let mut healthy = true;
    loop {
        tick.tick().await;
        let snap = state.snapshot.load_full();
        if snap.budgets.list.is_empty() {
            continue;
        }
        let result = fleet_round(&snap, &pg, &replica, stale_after, &mut seeded).await;
        match result {
            Ok(alerts) => {
                if !healthy {
                    tracing::info!("fleet budget figures refreshed again");
                    healthy = true;
                }
                for (alert, alert_id) in &alerts {
                    crate::webhook::log_crossed(alert, alert_id.as_deref());
                }
                if alerts.iter().any(|(_, id)| id.is_some()) {
                    state.alerts.wake();
                }
            }
            Err(err) if healthy => {
                healthy = false;
                tracing::warn!(error = %format!("{err:#}"), "cannot refresh the fleet's budget figures: budgets count this replica's calls only until postgresql answers");
            }
            Err(_) => {}
        }
    }
}

/// One refresh: seeds budget months not seen yet, syncs, claims the crossed thresholds (each
/// claimed one queued in the fleet's webhook outbox in the same transaction). Returns the
/// alerts this replica claimed, with the id of their webhook delivery.
async fn fleet_round(
    snap: &Arc<crate::state::Snapshot>,
    pg: &Arc<PgFleet>,
    replica: &str,
    stale: Duration,
    seeded: &mut std::collections::HashSet<(String, String)>,
) -> anyhow::Result<Vec<(crate::budget::Alert, Option<String>)>> {
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let marks = snap.budgets.fleet_marks(now_ms);
    // A budget month no replica has written yet (new month, a budget added by a reload)
    // gets its row from the month's calls first, or its earlier spend would be missed.
    let seeds: Vec<_> = marks
        .iter()
        .filter(|m| !seeded.contains(&(m.budget.clone(), m.month.clone())))
        .filter_map(|m| {
            let b = snap.budgets.list.iter().find(|b| b.name == m.budget)?;
            let scope = b.scope.clone();
            Some(crate::ledger::postgres::BudgetSeed {
                budget: m.budget.clone(),
                month: m.month.clone(),
                start_ms: m.start_ms,
                end_ms: m.end_ms,
                covers: Box::new(move |name, tags| {
                    scope.covers(name, &serde_json::from_str(tags).unwrap_or_default())
                }),
            })
        })
        .collect();
    if !seeds.is_empty() {
        let keys: Vec<_> = seeds
            .iter()
            .map(|s| (s.budget.clone(), s.month.clone()))
            .collect();
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.seed_budget_spend(seeds)).await??;
        seeded.extend(keys);
    }
    let payload = marks
        .iter()
        .map(|m| (m.budget.clone(), m.month.clone(), m.own_reserved))
        .collect();
    let fresh_after = now_ms - i64::try_from(stale.as_millis()).unwrap_or(i64::MAX);
    let figures = {
        let pg = pg.clone();
        let replica = replica.to_owned();
        tokio::task::spawn_blocking(move || pg.sync_fleet(&replica, payload, fresh_after)).await??
    };
    let figures: Vec<_> = figures
        .into_iter()
        .map(|(spent, others)| crate::budget::FleetFigure {
            spent_pico: spent,
            others_reserved_pico: others,
        })
        .collect();
    let crossed = snap.budgets.apply_fleet(&marks, &figures, now_ms);
    if crossed.is_empty() {
        return Ok(Vec::new());
    }
    let claims: Vec<_> = crossed
        .iter()
        .map(|a| crate::ledger::postgres::AlertClaim {
            budget: a.budget.clone(),
            month: a.month.clone(),
            threshold: a.fraction.to_string(),
            delivery: snap
                .alert_webhook
                .as_ref()
                .map(|_| crate::webhook::entry(a, now_ms)),
        })
        .collect();
    let ids: Vec<_> = claims
        .iter()
        .map(|c| c.delivery.as_ref().map(|e| e.id.clone()))
        .collect();
    let won = {
        let pg = pg.clone();
        let replica = replica.to_owned();
        tokio::task::spawn_blocking(move || pg.claim_and_queue_alerts(&replica, claims)).await??
    };
    Ok(crossed
        .into_iter()
        .zip(ids)
        .zip(won)
        .filter_map(|(a, won)| won.then_some(a))
        .collect())
}

/// Drops raw call partitions older than `months`, hourly (every replica may; they take turns).
async fn retention(pg: Arc<PgFleet>, months: u32) {
    let mut tick = tokio::time::interval(Duration::from_hours(1));
    loop {
        tick.tick().await;
        let pg = pg.clone();
        let now = jiff::Timestamp::now().as_millisecond();
        match tokio::task::spawn_blocking(move || pg.apply_retention(months, now)).await {
            Ok(Ok(dropped)) if !dropped.is_empty() => {
                tracing::info!(?dropped, "ledger retention applied");
            }
            Ok(Err(err)) => tracing::warn!(error = %format!("{err:#}"), "ledger retention failed"),
            _ => {}
        }
    }
}

fn migrate(path: &Path) -> anyhow::Result<()> {
    let config = load(path)?;
    let Some(url) = &config.ledger.url else {
        sqlite::open(Path::new(&config.ledger.path))?;
        println!(
            "sqlite ledger {} is current (it migrates itself when opened)",
            config.ledger.path
        );
        return Ok(());
    };
    let applied = crate::ledger::postgres::migrate(url.expose())?;
    if applied.is_empty() {
        println!(
            "postgresql ledger schema is current (version {})",
            crate::ledger::postgres::SCHEMA_VERSION
        );
    } else {
        println!(
            "applied migrations {applied:?}: schema version {}",
            crate::ledger::postgres::SCHEMA_VERSION
        );
    }
    Ok(())
}

fn ledger_export(path: &Path, from: Option<&str>, to: Option<&str>) -> anyhow::Result<()> {
    let config = load(path)?;
    let today = jiff::Timestamp::now()
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .date();
    let period = crate::report::period(from, to, today).map_err(|e| anyhow::anyhow!(e))?;
    let (from_ms, to_ms) = transfer::period_ms(&period)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let n = match &config.ledger.url {
        Some(url) => transfer::export(&PgReader::connect(url.expose())?, from_ms, to_ms, &mut out)?,
        None if !Path::new(&config.ledger.path).exists() => {
            anyhow::bail!("{}", no_ledger_yet(Path::new(&config.ledger.path)))
        }
        None => transfer::export(
            &sqlite::open_read_only(Path::new(&config.ledger.path))?,
            from_ms,
            to_ms,
            &mut out,
        )?,
    };
    eprintln!(
        "exported {n} calls from {} to {} (exclusive)",
        period.from, period.to
    );
    Ok(())
}

fn ledger_import(path: &Path, input: Option<&Path>) -> anyhow::Result<()> {
    let config = load(path)?;
    let budgets =
        crate::budget::Budgets::from_config(&config, jiff::Timestamp::now().as_millisecond())?;
    // Rolled up as the writer of `serve` rolls up: the same cap on a key's models in a day.
    let max_models = config.ledger.max_models_per_day;
    let mut store: Box<dyn Store> = match &config.ledger.url {
        Some(url) => {
            Box::new(PostgresStore::connect(url.expose())?.with_max_models_per_day(max_models))
        }
        None => Box::new(
            SqliteStore::open(Path::new(&config.ledger.path))?.with_max_models_per_day(max_models),
        ),
    };
    let mut reader: Box<dyn std::io::BufRead> = match input {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("cannot read {}", p.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    // Budget months are not columns: recompute them from this config so the shared budget
    // figures count the imported spend.
    let mut annotate = |r: &mut crate::ledger::Record| {
        let tags = r
            .tags
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        let name = r.project.as_deref().unwrap_or("");
        r.budget_months = budgets
            .list
            .iter()
            .filter(|b| r.project.is_some() && b.scope.covers(name, &tags))
            .map(|b| {
                (
                    Arc::from(b.name.as_str()),
                    Arc::from(crate::budget::Month::containing(r.ts_ms, &b.tz).label()),
                )
            })
            .collect();
    };
    let n = transfer::import(store.as_mut(), &mut reader, &mut annotate)?;
    eprintln!("imported {n} calls");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            summarize(path, &config);
            ExitCode::SUCCESS
        }
        Err(ConfigError::Invalid(problems)) => {
            eprintln!("{}: {} problem(s):", path.display(), problems.len());
            for p in problems {
                eprintln!("  - {p}");
            }
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}

/// Where the figures of the bundled price list should be checked.
const AWS_PRICING_PAGE: &str = "https://aws.amazon.com/bedrock/pricing/";

/// `check`'s report on a valid config: the counts, each entry, then notes and warnings.
fn summarize(path: &Path, config: &Config) {
    // Valid, so its prices build.
    let prices = config.price_table().unwrap_or_default();
    let entries = prices.entries();
    let bundled: Vec<&str> = entries
        .iter()
        .filter(|(_, p)| p.source == crate::pricing::SOURCE_BUILTIN)
        .map(|(m, _)| m.as_str())
        .collect();
    println!(
        "{}: OK: {} project(s), {} key(s), {} route(s), {} budget(s), {} price(s) ({} from the bundled table), {} rate limit(s)",
        path.display(),
        config.projects.len(),
        config.keys.len(),
        config.routes.len(),
        config.budgets.len(),
        entries.len(),
        bundled.len(),
        config.rate_limits.len()
    );
    for p in &config.projects {
        let tags = p
            .tags
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "  project {} ({}) {tags}",
            p.name,
            p.id.as_deref().unwrap_or("no id")
        );
    }
    for k in &config.keys {
        println!("  key {} -> [{}]", k.name, k.projects.join(", "));
    }
    for r in &config.routes {
        println!("  route {}/v1 -> {}", r.prefix, r.project);
    }
    for b in &config.budgets {
        println!(
            "  budget {}: ${} a month ({}), {}",
            b.name,
            b.monthly_usd,
            b.timezone,
            match b.action {
                crate::config::BudgetAction::Block => "block",
                crate::config::BudgetAction::Alert => "alert",
            }
        );
    }
    for r in &config.rate_limits {
        let who = match (&r.project, &r.key) {
            (Some(p), _) => format!("project {p}"),
            (_, Some(k)) => format!("key {k}"),
            _ => String::new(),
        };
        let per_minute = [
            r.requests_per_minute.map(|n| format!("{n} requests")),
            r.tokens_per_minute.map(|n| format!("{n} tokens")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ");
        println!("  rate limit {who}: {per_minute} a minute");
    }
    notes(config);
    warn_budget_tags(config);
    if !bundled.is_empty() {
        println!(
            "  warning: {} model(s) are priced only by the bundled table (config/prices.toml), whose figures are not checked against AWS's: {}. Verify each against {AWS_PRICING_PAGE} (prices differ by region and change) and set it in your own [[prices]] (or a [pricing] include file)",
            bundled.len(),
            bundled.join(", ")
        );
    }
}

/// What serving `config` means for a fleet, and what it needs from the environment.
fn notes(config: &Config) {
    if !config.rate_limits.is_empty() {
        match &config.limits.store {
            Some(url) => println!(
                "  rate limits: shared by every replica in {} (script {})",
                crate::config::describe_store_url(url).unwrap_or_default(),
                crate::ratelimit::redis::SCRIPT_NAME
            ),
            None => println!(
                "  note: rate limits are per replica (no [limits] store): with N replicas each limit admits up to N times its rate"
            ),
        }
    }
    if !config.budgets.is_empty() {
        if config.ledger.url.is_some() {
            println!(
                "  budgets: shared by every replica through the postgresql ledger (refreshed every {})",
                humantime_serde::re::humantime::format_duration(config.ledger.budget_refresh)
            );
        } else {
            println!(
                "  note: budgets are per process (sqlite ledger): several replicas need [ledger] url = \"postgres://...\" to hold them together"
            );
        }
        match config
            .alerts
            .webhook_url
            .as_ref()
            .and_then(|url| crate::webhook::Webhook::parse(url.expose()))
        {
            // The host only: the URL may carry a token.
            Some(hook) => println!(
                "  alerts: webhook to {} (an attempt may take {}; retried until a 2xx, for 24 h)",
                hook.host(),
                humantime_serde::re::humantime::format_duration(config.alerts.webhook_timeout)
            ),
            None => println!("  note: no [alerts] webhook_url: budget alerts only reach the log"),
        }
    }
    if is_demo_config(config) {
        println!(
            "  note: this is the demo's config: `mantlegate demo` runs it against its embedded simulated bedrock-mantle, which needs no Bedrock API key; `serve` would reach nothing at {} (set upstream.base_url and {} to serve it)",
            config.upstream.base_url, config.upstream.api_key_env
        );
    } else if config.upstream.auth == crate::config::UpstreamAuth::ApiKey
        && config.upstream.api_key_file.is_none()
        && std::env::var_os(&config.upstream.api_key_env).is_none()
    {
        println!(
            "  note: {} is not set in this environment; serve needs it",
            config.upstream.api_key_env
        );
    }
}

/// Warns of a tag budget that no project falls under: it would count nothing, most likely
/// for a typo in a tag key or value.
fn warn_budget_tags(config: &Config) {
    for b in &config.budgets {
        let Some(tags) = &b.tag else {
            continue;
        };
        let covers = config
            .projects
            .iter()
            .any(|p| tags.iter().all(|(k, v)| p.tags.get(k) == Some(v)));
        if covers {
            continue;
        }
        let scope = tags
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let hints: String = tags
            .iter()
            .filter_map(|(k, v)| {
                let values: std::collections::BTreeSet<&str> = config
                    .projects
                    .iter()
                    .filter_map(|p| p.tags.get(k).map(String::as_str))
                    .collect();
                if values.is_empty() {
                    let keys: std::collections::BTreeSet<&str> = config
                        .projects
                        .iter()
                        .flat_map(|p| p.tags.keys().map(String::as_str))
                        .collect();
                    crate::config::closest(k, keys).map(|c| format!("; did you mean tag `{c}`?"))
                } else if values.contains(v.as_str()) {
                    None
                } else {
                    crate::config::closest(v, values).map(|c| format!("; did you mean {k}={c}?"))
                }
            })
            .collect();
        println!(
            "  warning: budget `{}` counts the projects tagged {scope}, and no project is{hints}",
            b.name
        );
    }
}

/// Whether `config` is the demo's: its upstream is the placeholder that `mantlegate demo`
/// replaces with its embedded simulator (so no Bedrock key is needed to run it).
fn is_demo_config(config: &Config) -> bool {
    Config::from_toml(DEMO_CONFIG)
        .is_ok_and(|demo| demo.upstream.base_url == config.upstream.base_url)
}

fn keys_list(path: &Path) -> anyhow::Result<()> {
    let config = load(path)?;
    let last_used = match open_reader(&config) {
        Ok(reader) => reader.last_used()?,
        Err(_) => std::collections::HashMap::new(),
    };
    let now = jiff::Timestamp::now();
    println!(
        "{:<24} {:<10} {:<22} {:<24} {:<26} projects",
        "name", "state", "sha256", "expires_at", "last_used"
    );
    for k in &config.keys {
        let expires = k
            .expires_at
            .as_deref()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok());
        let state = crate::keys::state_of(k.disabled, expires, k.passthrough, now);
        let last = last_used
            .get(&k.sha256.get(..12).unwrap_or("").to_ascii_lowercase())
            .and_then(|ms| jiff::Timestamp::from_millisecond(*ms).ok())
            .map_or_else(|| "never".to_owned(), |t| t.to_string());
        println!(
            "{:<24} {:<10} {:<22} {:<24} {:<26} [{}]",
            k.name,
            state,
            format!("{}...", &k.sha256.get(..16).unwrap_or(&k.sha256)),
            k.expires_at.as_deref().unwrap_or("-"),
            last,
            k.projects.join(", ")
        );
    }
    Ok(())
}

/// `mantlegate keys new`: with a config, every project must be one it defines (checked
/// before a key is minted); with `write`, the `[[keys]]` entry goes into the config file and
/// the key is printed once, never written anywhere.
fn keys_new(
    config_path: Option<&Path>,
    name: &str,
    projects: &[String],
    write: bool,
) -> anyhow::Result<()> {
    if name.trim().is_empty() {
        anyhow::bail!("--name must not be empty: it names the key in logs and reports");
    }
    let Some(path) = config_path else {
        if !projects.is_empty() {
            eprintln!(
                "note: the projects are not checked against a config: pass --config FILE to check them (and --write to add the entry to it)"
            );
        }
        print_new_key(name, &crate::keys::mint(), projects);
        return Ok(());
    };
    let config = Config::load_for_projects(path).map_err(|e| match e {
        ConfigError::Invalid(problems) => anyhow::anyhow!(
            "{}: {} problem(s), no key was minted (`mantlegate check` lists them):\n{}",
            path.display(),
            problems.len(),
            problems
                .iter()
                .map(|p| format!("  - {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        ),
        other => anyhow::anyhow!("{other}"),
    })?;
    check_key_projects(&config, path, projects)?;
    let key = crate::keys::mint();
    if !write {
        print_new_key(name, &key, projects);
        return Ok(());
    }
    let bytes = crate::config::read_file(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("cannot read {}: not UTF-8 text", path.display()))?;
    let updated = crate::keys::add_to_config(&text, name, &key, projects)
        .with_context(|| format!("cannot edit {}", path.display()))?;
    // What is written must load as the file did: checked before the file is touched.
    if let Err(err) = Config::from_toml_for_projects(&updated, path.parent()) {
        anyhow::bail!(
            "the edited {} would not load ({err}); nothing was written",
            path.display()
        );
    }
    crate::projects::write_in_place(path, &updated)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let rotation = config.keys.iter().any(|k| k.name == name);
    println!("# The key (shown once: hand it to the app, keep it in a secret store):");
    println!("{key}");
    println!();
    println!(
        "# Added to {} (only the SHA-256 is stored; a running proxy takes it at its next reload):",
        path.display()
    );
    print!("{}", crate::keys::config_block(name, &key, projects));
    if rotation {
        println!(
            "# `{name}` now has two entries: a rotation. Remove the old one once the app uses the new key (its last use in `mantlegate keys list` stops moving)."
        );
    }
    Ok(())
}

/// Refuses a project `config` does not define, suggesting the nearest name.
fn check_key_projects(config: &Config, path: &Path, projects: &[String]) -> anyhow::Result<()> {
    let names: Vec<&str> = config.projects.iter().map(|p| p.name.as_str()).collect();
    for wanted in projects {
        if names.contains(&wanted.as_str()) {
            continue;
        }
        // An id where a name belongs: name the project it is.
        let hint = match config
            .projects
            .iter()
            .find(|p| p.id.as_deref() == Some(wanted))
        {
            Some(p) => format!(
                "; `{wanted}` is the id of `{}`: keys name projects by name",
                p.name
            ),
            None => crate::config::did_you_mean(wanted, names.iter().copied()),
        };
        let defined = if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        };
        anyhow::bail!(
            "project `{wanted}` is not defined in {}{hint} (its [[projects]]: {defined}); no key was minted",
            path.display()
        );
    }
    Ok(())
}

fn print_new_key(name: &str, key: &str, projects: &[String]) {
    println!("# The key (shown once: hand it to the app, keep it in a secret store):");
    println!("{key}");
    println!();
    println!("# Paste into the config (only the SHA-256 is stored):");
    print!("{}", crate::keys::config_block(name, key, projects));
}

/// The demo's configuration; its upstream is replaced by the simulator's address.
const DEMO_CONFIG: &str = include_str!("../config/demo.toml");
/// Admin token of the demo (public, like its keys).
const DEMO_ADMIN_TOKEN: &str = "mg-demo-admin-token";
/// Keys of the demo config (they are in the SHA-256 form in `config/demo.toml`).
const DEMO_KEYS: [(&str, &str); 3] = [
    ("chatbot-backend", "mg-demo-chatbot-key"),
    ("search-team", "mg-demo-search-key"),
    ("intern-laptop", "mg-demo-unassigned-key"),
];

async fn demo(listen: SocketAddr) -> anyhow::Result<()> {
    let sim = TcpListener::bind("127.0.0.1:0").await?;
    let sim_addr = sim.local_addr()?;
    let sim_router = crate::demo::router(crate::demo::SimOptions::default());
    tokio::spawn(async move { axum::serve(sim, sim_router).await });

    let mut config =
        Config::from_toml(DEMO_CONFIG).map_err(|e| anyhow::anyhow!("demo config: {e}"))?;
    config.upstream.base_url = format!("http://{sim_addr}");
    let snapshot = Snapshot::build(&config, Some("demo-upstream-key"))?;
    let base = format!("http://{listen}");
    println!("mantlegate demo: proxy on {base}, simulated bedrock-mantle on http://{sim_addr}\n");
    println!("Projects:");
    for p in &config.projects {
        let tags = p
            .tags
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        println!(
            "  {:<22} {:<22} {tags}",
            p.name,
            p.id.as_deref().unwrap_or("")
        );
    }
    println!("Keys:");
    for (name, key) in DEMO_KEYS {
        let projects = config
            .keys
            .iter()
            .find(|k| k.name == name)
            .map(|k| k.projects.join(", "))
            .unwrap_or_default();
        println!("  {name:<16} {key:<26} projects: [{projects}]");
    }
    println!("Routes:");
    for r in &config.routes {
        println!("  {base}{}/v1 -> {}", r.prefix, r.project);
    }
    println!(
        r#"
Try it (attributed to CustomerChatbot-Prod by the key):
  curl -s {base}/v1/chat/completions -H 'Authorization: Bearer mg-demo-chatbot-key' -H 'Content-Type: application/json' -d '{{"model":"openai.gpt-oss-120b","messages":[{{"role":"user","content":"Hello"}}]}}' -D - 

A key with no project is refused (400 project_required):
  curl -s {base}/v1/chat/completions -H 'Authorization: Bearer mg-demo-unassigned-key' -H 'Content-Type: application/json' -d '{{"model":"openai.gpt-oss-120b","messages":[{{"role":"user","content":"Hello"}}]}}'

Python (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="mg-demo-search-key", project="proj_demosearch")
  for event in client.responses.create(model="openai.gpt-oss-120b", input="Hello", stream=True):
      print(event.type)

What it cost, by team (the admin API, or: cargo run -- report --config config/demo.toml --group-by tag:Team):
  curl -s '{base}/admin/v1/costs?group_by=tag:Team,model&format=csv' -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}'

Access log lines (JSON, one per call) follow below. Ctrl-C stops the demo.
"#
    );
    run(
        listen,
        snapshot,
        &config,
        Some(DEMO_ADMIN_TOKEN.to_owned()),
        None,
    )
    .await
}

async fn simulate(listen: SocketAddr, event_delay_ms: u64) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    let router = crate::demo::router(crate::demo::SimOptions {
        event_delay: Duration::from_millis(event_delay_ms),
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}
