//! The TOML configuration: one serde tree with `deny_unknown_fields`, named defaults, and a
//! `validate()` that reports every problem with its path.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::pricing::{PriceEntry, PriceTable, PricingConfig};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where and how the proxy listens.
    #[serde(default)]
    pub server: ServerConfig,
    /// The bedrock-mantle endpoint calls are forwarded to.
    pub upstream: UpstreamConfig,
    /// What happens to a call that resolves to no project.
    #[serde(default)]
    pub attribution: AttributionConfig,
    /// Bedrock projects calls can be billed to.
    #[serde(default)]
    pub projects: Vec<ProjectConfig>,
    /// Caller keys, stored as their SHA-256, each with the projects it may use.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// Path prefixes that attribute every call coming through them to one project.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Where call records are kept.
    #[serde(default)]
    pub ledger: LedgerConfig,
    /// The admin API.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Where prices come from.
    #[serde(default)]
    pub pricing: PricingConfig,
    /// Model prices (USD per million tokens), overriding the shipped list.
    #[serde(default)]
    pub prices: Vec<PriceEntry>,
    /// Tag rules every project must follow.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Monthly spending limits per project or tag value.
    #[serde(default)]
    pub budgets: Vec<BudgetConfig>,
    /// Request and token rates per project or key.
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    /// Defaults of admission control.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Where budget alerts go.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// Directory of the config file, for relative paths in it (not a TOML field).
    #[serde(skip)]
    pub source_dir: Option<std::path::PathBuf>,
}

/// `[policy]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Tags every project must carry.
    #[serde(default)]
    pub required_tags: Vec<String>,
    /// Tag -> the only values it may take.
    #[serde(default)]
    pub allowed_values: BTreeMap<String, Vec<String>>,
    /// Tag -> a regular expression its value must match (anchor it with `^...$`).
    #[serde(default)]
    pub patterns: BTreeMap<String, String>,
}

/// `[[budgets]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Name in errors, alerts and metrics.
    pub name: String,
    /// The project (by name) whose calls count; or use `tag`.
    pub project: Option<String>,
    /// Tag values whose projects' calls count (all must match); or use `project`.
    pub tag: Option<BTreeMap<String, String>>,
    /// Monthly limit in USD, as a decimal string.
    pub monthly_usd: String,
    /// `alert` (default: only alerts) or `block` (429 `budget_exceeded` once spent).
    #[serde(default)]
    pub action: BudgetAction,
    /// Fractions of the limit at which to alert, once each per month.
    #[serde(default = "default_alert_at")]
    pub alert_at: Vec<f64>,
    /// IANA time zone whose calendar months the budget follows.
    #[serde(default = "default_timezone")]
    pub timezone: String,
}

fn default_alert_at() -> Vec<f64> {
    vec![0.5, 0.8, 1.0]
}
fn default_timezone() -> String {
    "UTC".to_owned()
}

/// What a budget does when spent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetAction {
    /// Log and notify only.
    #[default]
    Alert,
    /// Refuse calls with 429 `budget_exceeded`.
    Block,
}

/// `[[rate_limits]]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// The project (by name) limited; or use `key`.
    pub project: Option<String>,
    /// The key (by name) limited; or use `project`.
    pub key: Option<String>,
    /// Requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Input + output tokens per minute (estimated at admission, corrected at the end).
    pub tokens_per_minute: Option<u64>,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Output tokens assumed for a call that sets no `max_tokens` (budget reservations and
    /// token rate limits).
    pub default_max_output_tokens: u64,
    /// Where the rate-limit counters live: `redis://` / `rediss://` URL shared by every replica.
    /// Unset: in each process (limits per replica). Read at start; a reload does not change it.
    pub store: Option<String>,
    /// How long a call waits for the store before it is decided in memory (fail open), and
    /// the store is probed in the background until it answers again.
    #[serde(with = "humantime_serde")]
    pub store_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            default_max_output_tokens: 4096,
            store: None,
            store_timeout: Duration::from_millis(100),
        }
    }
}

/// `[alerts]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// URL that receives one JSON POST per budget alert, retried until it answers 2xx (for up
    /// to a day). It may carry a token: logs name only its host.
    pub webhook_url: Option<crate::secret::Secret<String>>,
    /// How long one delivery attempt may take, connecting included; past it the attempt
    /// counts as failed (`timeout`) and is retried.
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
}

/// Default of `[alerts] webhook_timeout`.
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            webhook_url: None,
            webhook_timeout: DEFAULT_WEBHOOK_TIMEOUT,
        }
    }
}

/// `[ledger]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// SQLite file of the embedded ledger (relative to the working directory).
    pub path: String,
    /// Records that may wait for the writer; past it new records are dropped and counted.
    pub queue_capacity: usize,
    /// The `PostgreSQL` ledger replicas share (`postgres://...`; `?sslmode=require` for TLS,
    /// checked against the system trust store). Unset: the SQLite ledger at `path`.
    pub url: Option<crate::secret::Secret<String>>,
    /// `PostgreSQL` only: months of raw call records kept; older whole months are dropped
    /// hourly (per-day totals and budget figures stay). Unset: kept forever.
    pub retention_months: Option<u32>,
    /// `PostgreSQL` only: how often a replica reads the fleet's month-to-date budget spend
    /// and publishes its own reservations (the window in which replicas do not see each
    /// other's calls).
    #[serde(with = "humantime_serde")]
    pub budget_refresh: Duration,
    /// Distinct models one key's calls may add to a day's roll-up; the calls of further models
    /// are rolled up under `(other)` (the calls table keeps the real model), so a client
    /// naming a new model on every call cannot grow reports without bound.
    pub max_models_per_day: usize,
}

/// Default of `[ledger] max_models_per_day`.
pub const DEFAULT_MAX_MODELS_PER_DAY: usize = 1000;

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            path: "mantlegate.db".to_owned(),
            queue_capacity: 100_000,
            url: None,
            retention_months: None,
            budget_refresh: Duration::from_secs(1),
            max_models_per_day: DEFAULT_MAX_MODELS_PER_DAY,
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Environment variable holding the admin bearer token. Unset: the admin API is off.
    pub token_env: Option<String>,
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Project tags exported as metric labels (`tag_<Name>`). Keep the list short: each
    /// distinct value is a time series.
    #[serde(default)]
    pub tag_labels: Vec<String>,
    /// Environment variable holding a bearer token that may read `/metrics` on the main
    /// listener (as the admin token may). Unset: only the admin token may; a scraper with
    /// neither uses `server.metrics_listen`, which asks for no credentials.
    pub token_env: Option<String>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on (`--listen` overrides it). Port 0 picks a free port.
    pub listen: String,
    /// Largest request body accepted; larger ones get 413 `request_too_large`. Also the most
    /// mantlegate reads of a non-streamed answer after its client left, for its usage.
    pub max_body_bytes: usize,
    /// On SIGTERM/SIGINT, how long calls in flight may take to finish before exit.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Most calls in flight at once; past it, 503 `overloaded` at once (never a queue).
    pub max_in_flight: usize,
    /// Serve `/metrics` without credentials on this address (keep it private). The main
    /// listener serves `/metrics` only to the admin token or `metrics.token_env`'s.
    pub metrics_listen: Option<String>,
    /// How long a connection may take, from accept, to send its first complete request head
    /// (for HTTP/2: the preface, SETTINGS and a stream's complete headers); also how long any
    /// later HTTP/1 head may take from its first byte. Past it the connection is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a connection may sit with no request in progress (an idle HTTP/1 keep-alive
    /// connection, an HTTP/2 connection with no open stream) before it is closed. Also the
    /// HTTP/2 keep-alive ping interval; a ping unanswered within it closes the connection. Also
    /// how long a client may take nothing of an answer mantlegate has more of (over HTTP/2: a
    /// stream without flow-control window): the call is then given up, outcome
    /// `client_stalled`, its upstream connection closed and the answer broken off.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long a request body may take to arrive whole, from its head; past it 408
    /// `request_timeout` and the connection is closed. A call counts against `max_in_flight`
    /// only once its body is in.
    #[serde(with = "humantime_serde")]
    pub request_body_timeout: Duration,
    /// Most client connections open at once; when full, the longest-idle connection is closed
    /// to make room for a new one. Unset: derived from the file-descriptor limit (raised to
    /// its hard limit at start), leaving room for upstream connections and the ledger.
    pub max_connections: Option<usize>,
}

/// `server.header_read_timeout` unless set.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// `server.idle_timeout` unless set.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_mins(1);
/// `server.request_body_timeout` unless set.
pub const DEFAULT_REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest connection timeout accepted: past an hour a timeout no longer protects anything.
const MAX_CONNECTION_TIMEOUT: Duration = Duration::from_hours(1);
/// The most connections `server.max_connections` may name (far past any file-descriptor limit
/// a machine grants: a larger number is a typo).
const MAX_CONNECTIONS: usize = 10_000_000;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_owned(),
            max_body_bytes: 10 * 1024 * 1024,
            drain_timeout: Duration::from_secs(30),
            max_in_flight: 10_000,
            metrics_listen: None,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            request_body_timeout: DEFAULT_REQUEST_BODY_TIMEOUT,
            max_connections: None,
        }
    }
}

/// `[upstream]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Scheme and host of bedrock-mantle, with an optional path prefix.
    pub base_url: String,
    /// How mantlegate authenticates upstream: `api_key` or `sigv4`.
    #[serde(default)]
    pub auth: UpstreamAuth,
    /// Environment variable holding the Bedrock API key sent upstream.
    #[serde(default = "default_api_key_env")]
    pub api_key_env: String,
    /// File holding the Bedrock API key (re-read when it changes); overrides `api_key_env`.
    pub api_key_file: Option<String>,
    /// Environment variable holding the key for the Projects API (`mantlegate projects`).
    pub admin_api_key_env: Option<String>,
    /// AWS region for SigV4 (default: read from the base URL's host).
    pub region: Option<String>,
    /// Path prefix models live under unless `model_prefixes` says otherwise.
    #[serde(default = "default_prefix")]
    pub default_prefix: String,
    /// Models served under another prefix (first match wins).
    #[serde(default)]
    pub model_prefixes: Vec<ModelPrefix>,
    /// Time allowed to open a connection to the upstream.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed between sending a call and receiving the upstream's response head.
    /// Non-streamed calls send their head only when generation ends, so keep it generous.
    #[serde(default = "default_response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Longest gap between two body frames of an answer; after it the answer is broken off
    /// (the client sees it incomplete).
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Longest a whole call may take, head and body; after it the answer is broken off.
    #[serde(default = "default_total_timeout", with = "humantime_serde")]
    pub total_timeout: Duration,
    /// Extra attempts on connection failures and on 429/503 answers, before anything was
    /// sent to the client.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First retry delay; doubled each attempt, with jitter.
    #[serde(default = "default_retry_backoff", with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest delay between attempts; an upstream `retry-after` longer than this is not
    /// waited for (the answer is relayed instead).
    #[serde(default = "default_retry_max_delay", with = "humantime_serde")]
    pub retry_max_delay: Duration,
}

fn default_api_key_env() -> String {
    "BEDROCK_API_KEY".to_owned()
}
fn default_prefix() -> String {
    "/v1".to_owned()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_idle_timeout() -> Duration {
    Duration::from_mins(2)
}
fn default_total_timeout() -> Duration {
    Duration::from_mins(30)
}
fn default_retries() -> u32 {
    2
}
fn default_retry_backoff() -> Duration {
    Duration::from_millis(200)
}
fn default_retry_max_delay() -> Duration {
    Duration::from_secs(5)
}
fn default_response_timeout() -> Duration {
    Duration::from_mins(5)
}

impl UpstreamConfig {
    /// The region SigV4 signs for: `region`, else the one in the base URL's host.
    #[must_use]
    pub fn signing_region(&self) -> Option<String> {
        self.region
            .clone()
            .or_else(|| crate::sigv4::region_from_url(&self.base_url))
    }
}

/// How mantlegate authenticates to bedrock-mantle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamAuth {
    /// A Bedrock API key as a bearer token.
    #[default]
    ApiKey,
    /// AWS SigV4 with credentials from the standard AWS chain.
    Sigv4,
}

/// `[[upstream.model_prefixes]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrefix {
    /// Exact model name, or a prefix ending in `*`.
    pub model: String,
    /// Upstream path prefix for that model, e.g. `/openai/v1`.
    pub prefix: String,
}

/// `[attribution]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributionConfig {
    /// `reject` (400 `project_required`) or `default` (bill `default_project`).
    #[serde(default)]
    pub on_missing: OnMissing,
    /// Project name used when `on_missing = "default"`.
    pub default_project: Option<String>,
}

/// What to do with a call that resolves to no project.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMissing {
    /// Refuse it with 400 `project_required`.
    #[default]
    Reject,
    /// Bill it to `default_project`.
    Default,
}

/// `[[projects]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    /// Unique handle used everywhere in this file.
    pub name: String,
    /// The Bedrock project ID sent upstream in `OpenAI-Project`.
    pub id: Option<String>,
    /// Cost allocation tags of the project.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// `[[keys]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Name of the key in logs, errors and reports.
    pub name: String,
    /// Lowercase hex SHA-256 of the key (`mantlegate keys new` prints it).
    pub sha256: String,
    /// Project names the key may use; the first is its default. Empty: none of its own.
    #[serde(default)]
    pub projects: Vec<String>,
    /// When the key stops working (RFC 3339, e.g. `2027-01-31T00:00:00Z`).
    pub expires_at: Option<String>,
    /// A disabled key gets 401 (kept in the file for the record).
    #[serde(default)]
    pub disabled: bool,
    /// The key is the caller's own Bedrock API key: forward it upstream instead of
    /// mantlegate's, still enforcing the project.
    #[serde(default)]
    pub passthrough: bool,
}

/// `[[routes]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix, e.g. `/chatbot` for apps using `base_url = http://HOST/chatbot/v1`.
    pub prefix: String,
    /// Project name every call through this route is billed to.
    pub project: String,
}

/// One problem found in a configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the offending field, e.g. `keys[2].projects[0]`.
    pub path: String,
    /// What is wrong, in words a person can act on.
    pub message: String,
    /// The line of the config file the path leads to (1-based), when the problem was found
    /// in a file's text and the path is in it: the field's line, else that of the nearest
    /// table or entry holding it.
    pub line: Option<usize>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} (line {line}): {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// Gives each problem the line of `text` its path leads to (see [`Problem::line`]).
fn locate(problems: &mut [Problem], text: &str) {
    let Ok(doc) = toml_edit::Document::parse(text) else {
        return;
    };
    for p in problems {
        p.line = offset_of(doc.as_item(), &p.path).map(|at| line_at(text, at));
    }
}

/// 1-based line of byte `offset` in `text`.
fn line_at(text: &str, offset: usize) -> usize {
    text.get(..offset).unwrap_or(text).matches('\n').count() + 1
}

/// One step of a problem path: a key, or an index into an array.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// `keys[2].projects[0]` as steps; `None` for a path that is not into the file (a price
/// file's problem, `builtin: prices[0].model`).
fn steps(path: &str) -> Option<Vec<Step<'_>>> {
    if path.contains(": ") {
        return None;
    }
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        out.push(Step::Key(key));
        while let Some((index, after)) = rest.split_once(']') {
            out.push(Step::Index(index.parse().ok()?));
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    Some(out)
}

/// Where in the file `path` leads: the start of the deepest key, value or table header on
/// it that the document has.
fn offset_of(root: &toml_edit::Item, path: &str) -> Option<usize> {
    use toml_edit::{Item, Table, Value};
    #[derive(Clone, Copy)]
    enum Node<'a> {
        Item(&'a Item),
        Table(&'a Table),
        Value(&'a Value),
    }
    let mut node = Node::Item(root);
    let mut found = None;
    for step in steps(path)? {
        let next = match (step, node) {
            (Step::Key(k), Node::Item(item)) => item
                .as_table_like()
                .and_then(|t| t.get_key_value(k))
                .map(|(key, item)| (key.span(), Node::Item(item))),
            (Step::Key(k), Node::Table(t)) => t
                .get_key_value(k)
                .map(|(key, item)| (key.span(), Node::Item(item))),
            (Step::Key(k), Node::Value(Value::InlineTable(t))) => t
                .get_key_value(k)
                .map(|(key, item)| (key.span(), Node::Item(item))),
            (Step::Index(i), Node::Item(Item::ArrayOfTables(a))) => {
                a.get(i).map(|t| (t.span(), Node::Table(t)))
            }
            (
                Step::Index(i),
                Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)),
            ) => a.get(i).map(|v| (v.span(), Node::Value(v))),
            _ => None,
        };
        let Some((span, next)) = next else {
            break;
        };
        found = span.map(|s| s.start).or(found);
        node = next;
    }
    found
}

/// A configuration that could not be loaded: unreadable, unparsable, or invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not fit the schema (unknown field, wrong type).
    #[error("{0}")]
    Parse(String),
    /// Semantic problems, all of them.
    #[error("{} problem(s) in the configuration:\n{}", .0.len(), list(.0))]
    Invalid(Vec<Problem>),
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Largest configuration (or upstream key) file read: a config is kilobytes, and a path that
/// leads to more (a log, a device) is not one.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads of a file that keeps changing under them before [`read_file`] gives up.
const READ_ATTEMPTS: usize = 5;

/// Reads a configuration file as the config loader and the reload watcher do: only a regular
/// file (a symlink to one is fine) of at most [`MAX_FILE_BYTES`], opened without blocking (a
/// FIFO put at the path is refused at once instead of waiting for a writer), and read again
/// until two reads agree (at most a few times), so that a file being rewritten in place is
/// not taken half written.
///
/// # Errors
/// The file cannot be opened or read, is not a regular file, is too large, or kept changing.
pub fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    read_stable(|| read_regular(path))
}

/// Reads with `read` until two reads in a row agree, [`READ_ATTEMPTS`] reads after the first
/// at most.
fn read_stable(mut read: impl FnMut() -> std::io::Result<Vec<u8>>) -> std::io::Result<Vec<u8>> {
    let mut last = read()?;
    for _ in 0..READ_ATTEMPTS {
        let next = read()?;
        if next == last {
            return Ok(next);
        }
        last = next;
    }
    Err(std::io::Error::other(format!(
        "it changed while being read, {READ_ATTEMPTS} times in a row (replace it with a rename, \
         not by rewriting it in place)"
    )))
}

/// One read of a regular file of at most [`MAX_FILE_BYTES`].
fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    // Checked before opening, so that no device is even opened, and again on the file opened,
    // which is what is read (the path may have changed in between).
    regular(&std::fs::metadata(path)?)?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options.open(path)?;
    let len = regular(&file.metadata()?)?;
    let mut text = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // One byte more than allowed tells a file that grew past the limit after the check.
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    Ok(text)
}

/// The length of a regular file within the limit; anything else is an error saying what it is.
fn regular(meta: &std::fs::Metadata) -> std::io::Result<u64> {
    let kind = meta.file_type();
    if !kind.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a regular file (it is {})", describe(kind)),
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    Ok(meta.len())
}

fn too_large() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("larger than the {MAX_FILE_BYTES} bytes a configuration file may have"),
    )
}

fn describe(kind: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_char_device() {
            return "a character device";
        }
        if kind.is_block_device() {
            return "a block device";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    if kind.is_dir() {
        "a directory"
    } else {
        "not a file"
    }
}

/// [`read_file`] as UTF-8 text, with the path in the error.
fn read_text(path: &Path) -> Result<String, ConfigError> {
    let read = |source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    };
    let bytes = read_file(path).map_err(read)?;
    String::from_utf8(bytes).map_err(|_| {
        read(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8 text",
        ))
    })
}

impl Config {
    /// Reads, parses and validates a configuration file.
    ///
    /// # Errors
    /// Returns every problem found; see [`ConfigError`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_text(path)?;
        Self::from_toml_in(&text, path.parent()).map_err(|e| match e {
            ConfigError::Parse(msg) => ConfigError::Parse(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Like [`Config::load`], except that a `[[projects]]` entry without an `id` is not a
    /// problem: `mantlegate projects plan/apply` creates those projects and writes their ids back.
    ///
    /// # Errors
    /// Returns every other problem found; see [`ConfigError`].
    pub fn load_for_projects(path: &Path) -> Result<Self, ConfigError> {
        let text = read_text(path)?;
        Self::from_toml_for_projects(&text, path.parent()).map_err(|e| match e {
            ConfigError::Parse(msg) => ConfigError::Parse(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// [`Config::load_for_projects`] on text, with relative paths resolved in `dir`.
    ///
    /// # Errors
    /// Returns every problem found but missing project ids; see [`ConfigError`].
    pub fn from_toml_for_projects(text: &str, dir: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config: Self =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.source_dir = dir.map(Path::to_path_buf);
        // The only problem reported at `projects[i].id` of an entry without an id is that it
        // has none.
        let no_id: HashSet<String> = config
            .projects
            .iter()
            .enumerate()
            .filter(|(_, p)| p.id.is_none())
            .map(|(i, _)| format!("projects[{i}].id"))
            .collect();
        let mut problems: Vec<Problem> = config
            .validate()
            .into_iter()
            .filter(|p| !no_id.contains(&p.path))
            .collect();
        if problems.is_empty() {
            Ok(config)
        } else {
            locate(&mut problems, text);
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Parses and validates a configuration from TOML text.
    ///
    /// # Errors
    /// Returns every problem found; see [`ConfigError`].
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_in(text, None)
    }

    /// Like [`Config::from_toml`], with relative paths (price includes) resolved in `dir`.
    ///
    /// # Errors
    /// Returns every problem found; see [`ConfigError`].
    pub fn from_toml_in(text: &str, dir: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config: Self =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.source_dir = dir.map(Path::to_path_buf);
        let mut problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            locate(&mut problems, text);
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Checks everything serde cannot: references, uniqueness, formats. Returns all problems.
    #[must_use]
    pub fn validate(&self) -> Vec<Problem> {
        let mut v = Validator::default();
        self.validate_server(&mut v);
        self.validate_upstream(&mut v);
        let names = self.validate_projects(&mut v);
        self.validate_attribution(&mut v, &names);
        self.validate_keys(&mut v, &names);
        self.validate_routes(&mut v, &names);
        self.validate_rest(&mut v);
        self.validate_policy(&mut v);
        self.validate_governance(&mut v, &names);
        v.problems
    }

    fn validate_policy(&self, v: &mut Validator) {
        let policy = &self.policy;
        let mut patterns = Vec::new();
        for (tag, pattern) in &policy.patterns {
            match regex::Regex::new(pattern) {
                Ok(re) => patterns.push((tag, re)),
                Err(e) => v.add(
                    format!("policy.patterns.{tag}"),
                    format!("`{pattern}` is not a valid regular expression: {e}"),
                ),
            }
        }
        for (i, p) in self.projects.iter().enumerate() {
            for (key, value) in &p.tags {
                let path = format!("projects[{i}].tags.{key}");
                if let Err(why) = crate::policy::check_tag(key, value) {
                    v.add(path, format!("project `{}`: {why}", p.name));
                }
            }
            for tag in &policy.required_tags {
                if !p.tags.contains_key(tag) {
                    v.add(
                        format!("projects[{i}].tags"),
                        format!("project `{}` lacks the required tag `{tag}`", p.name),
                    );
                }
            }
            for (tag, allowed) in &policy.allowed_values {
                if let Some(value) = p.tags.get(tag)
                    && !allowed.contains(value)
                {
                    v.add(
                        format!("projects[{i}].tags.{tag}"),
                        format!(
                            "project `{}`: `{value}` is not an allowed {tag}; allowed: {}",
                            p.name,
                            allowed.join(", ")
                        ),
                    );
                }
            }
            for (tag, re) in &patterns {
                if let Some(value) = p.tags.get(tag.as_str())
                    && !re.is_match(value)
                {
                    v.add(
                        format!("projects[{i}].tags.{tag}"),
                        format!(
                            "project `{}`: `{value}` does not match the {tag} pattern `{}`",
                            p.name,
                            re.as_str()
                        ),
                    );
                }
            }
        }
    }

    fn validate_governance(&self, v: &mut Validator, names: &HashSet<&str>) {
        let mut budget_names = HashSet::new();
        for (i, b) in self.budgets.iter().enumerate() {
            let path = format!("budgets[{i}]");
            if b.name.trim().is_empty() || !budget_names.insert(b.name.as_str()) {
                v.add(format!("{path}.name"), "must be non-empty and unique");
            }
            match (&b.project, &b.tag) {
                (Some(p), None) => check_ref(v, &format!("{path}.project"), p, names),
                (None, Some(t)) if !t.is_empty() => {}
                _ => v.add(
                    path.clone(),
                    "set exactly one of `project` or `tag = { Name = \"value\" }`",
                ),
            }
            match b.monthly_usd.parse::<rust_decimal::Decimal>() {
                Ok(d) if d > rust_decimal::Decimal::ZERO => {}
                _ => v.add(
                    format!("{path}.monthly_usd"),
                    format!(
                        "`{}` is not a positive decimal amount such as \"500\"",
                        b.monthly_usd
                    ),
                ),
            }
            if b.alert_at.iter().any(|f| !(*f > 0.0 && *f <= 10.0)) {
                v.add(
                    format!("{path}.alert_at"),
                    "fractions of the limit must be greater than 0 (1.0 = the whole budget)",
                );
            }
            if b.alert_at.len() > 32 {
                v.add(format!("{path}.alert_at"), "at most 32 thresholds");
            }
            if jiff::tz::TimeZone::get(&b.timezone).is_err() {
                v.add(
                    format!("{path}.timezone"),
                    format!(
                        "`{}` is not an IANA time zone such as Europe/Berlin",
                        b.timezone
                    ),
                );
            }
        }
        for (i, r) in self.rate_limits.iter().enumerate() {
            let path = format!("rate_limits[{i}]");
            match (&r.project, &r.key) {
                (Some(p), None) => check_ref(v, &format!("{path}.project"), p, names),
                (None, Some(k)) => {
                    if !self.keys.iter().any(|key| &key.name == k) {
                        v.add(
                            format!("{path}.key"),
                            format!(
                                "no [[keys]] entry is named `{k}`{}",
                                did_you_mean(k, self.keys.iter().map(|key| key.name.as_str()))
                            ),
                        );
                    }
                }
                _ => v.add(path.clone(), "set exactly one of `project` or `key`"),
            }
            if r.requests_per_minute.is_none() && r.tokens_per_minute.is_none() {
                v.add(
                    path.clone(),
                    "set requests_per_minute, tokens_per_minute or both",
                );
            }
            if r.requests_per_minute == Some(0) || r.tokens_per_minute == Some(0) {
                v.add(
                    path,
                    "a limit of 0 would refuse every call: remove the key's access instead",
                );
            }
        }
        if self.limits.default_max_output_tokens == 0 {
            v.add("limits.default_max_output_tokens", "must be greater than 0");
        }
        if let Some(url) = &self.limits.store
            && let Err(problem) = describe_store_url(url)
        {
            v.add("limits.store", problem);
        }
        if self.limits.store_timeout.is_zero()
            || self.limits.store_timeout > Duration::from_secs(10)
        {
            v.add(
                "limits.store_timeout",
                "must be between 1ms and 10s: every call may wait this long for Redis",
            );
        }
        self.validate_alerts(v);
    }

    fn validate_alerts(&self, v: &mut Validator) {
        if let Some(url) = &self.alerts.webhook_url
            && crate::webhook::Webhook::parse(url.expose()).is_none()
        {
            // Not quoted: the URL may carry a token.
            v.add(
                "alerts.webhook_url",
                "is not an http(s) URL with a host (e.g. \"https://hooks.example.com/mantlegate\")",
            );
        }
        if self.alerts.webhook_timeout.is_zero()
            || self.alerts.webhook_timeout > Duration::from_mins(1)
        {
            v.add(
                "alerts.webhook_timeout",
                "must be between 1ms and 1m: one delivery attempt holds the endpoint this long",
            );
        }
    }

    /// The price table this config describes.
    ///
    /// # Errors
    /// Every problem with the prices, with its place.
    pub fn price_table(&self) -> Result<PriceTable, Vec<Problem>> {
        PriceTable::build(&self.pricing, self.source_dir.as_deref(), &self.prices).map_err(
            |errors| {
                errors
                    .into_iter()
                    .map(|(path, message)| Problem {
                        path,
                        message,
                        line: None,
                    })
                    .collect()
            },
        )
    }

    fn validate_rest(&self, v: &mut Validator) {
        if self.ledger.path.trim().is_empty() {
            v.add("ledger.path", "must name a file");
        }
        if let Some(url) = &self.ledger.url {
            let url = url.expose();
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                v.add("ledger.url", "must be a postgres:// or postgresql:// URL");
            } else if let Err(err) = url.parse::<tokio_postgres::Config>() {
                v.add("ledger.url", format!("not a valid PostgreSQL URL: {err}"));
            }
        }
        match (self.ledger.retention_months, &self.ledger.url) {
            (Some(0), _) => v.add("ledger.retention_months", "must be at least 1"),
            (Some(_), None) => v.add(
                "ledger.retention_months",
                "needs ledger.url: only the PostgreSQL ledger drops old records",
            ),
            _ => {}
        }
        if self.ledger.budget_refresh < Duration::from_millis(10)
            || self.ledger.budget_refresh > Duration::from_mins(1)
        {
            v.add(
                "ledger.budget_refresh",
                "must be between 10ms and 1m: it bounds how long replicas miss each other's spend",
            );
        }
        if self.ledger.max_models_per_day == 0 || self.ledger.max_models_per_day > 1_000_000 {
            v.add("ledger.max_models_per_day", "must be from 1 to 1000000");
        }
        if self.ledger.queue_capacity == 0 {
            v.add("ledger.queue_capacity", "must be greater than 0");
        }
        if self.admin.token_env.as_deref().is_some_and(str::is_empty) {
            v.add("admin.token_env", "must name an environment variable");
        }
        if self.metrics.token_env.as_deref().is_some_and(str::is_empty) {
            v.add("metrics.token_env", "must name an environment variable");
        }
        for (i, tag) in self.metrics.tag_labels.iter().enumerate() {
            let valid = tag
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                v.add(
                    format!("metrics.tag_labels[{i}]"),
                    format!("`{tag}` cannot be a Prometheus label: use letters, digits and `_`"),
                );
            }
        }
        if let Err(problems) = self.price_table() {
            v.problems.extend(problems);
        }
    }

    fn validate_server(&self, v: &mut Validator) {
        if self.server.listen.parse::<SocketAddr>().is_err() {
            v.add(
                "server.listen",
                format!(
                    "`{}` is not an IP address and port, e.g. 127.0.0.1:8080",
                    self.server.listen
                ),
            );
        }
        if self.server.max_in_flight == 0 {
            v.add("server.max_in_flight", "must be greater than 0");
        }
        if let Some(m) = &self.server.metrics_listen
            && m.parse::<SocketAddr>().is_err()
        {
            v.add(
                "server.metrics_listen",
                format!("`{m}` is not an IP address and port, e.g. 127.0.0.1:9090"),
            );
        }
        if self.server.max_body_bytes == 0 {
            v.add("server.max_body_bytes", "must be greater than 0");
        }
        for (name, value) in [
            ("header_read_timeout", self.server.header_read_timeout),
            ("idle_timeout", self.server.idle_timeout),
            ("request_body_timeout", self.server.request_body_timeout),
        ] {
            if value.is_zero() {
                v.add(
                    format!("server.{name}"),
                    "must be greater than 0 (a connection would be closed at once)",
                );
            } else if value > MAX_CONNECTION_TIMEOUT {
                v.add(
                    format!("server.{name}"),
                    format!("{value:?} is too long to protect anything: at most 1h"),
                );
            }
        }
        match self.server.max_connections {
            Some(0) => v.add(
                "server.max_connections",
                "must be greater than 0 (leave it unset to derive it from the file-descriptor limit)",
            ),
            Some(n) if n > MAX_CONNECTIONS => v.add(
                "server.max_connections",
                format!(
                    "{n} is more than any file-descriptor limit allows: at most {MAX_CONNECTIONS}, or leave it unset to derive it"
                ),
            ),
            _ => {}
        }
    }

    fn validate_upstream(&self, v: &mut Validator) {
        let up = &self.upstream;
        match reqwest::Url::parse(&up.base_url) {
            Ok(url) => {
                if !matches!(url.scheme(), "http" | "https") {
                    v.add("upstream.base_url", "must start with https:// or http://");
                }
                if url.query().is_some() || url.fragment().is_some() {
                    v.add(
                        "upstream.base_url",
                        "must not have a query string or fragment",
                    );
                }
                if url.host_str().is_none() {
                    v.add("upstream.base_url", "must name a host");
                }
            }
            Err(e) => v.add(
                "upstream.base_url",
                format!("`{}` is not a URL: {e}", up.base_url),
            ),
        }
        if up.auth == UpstreamAuth::Sigv4 {
            match up.region.as_deref() {
                Some(r)
                    if r.is_empty()
                        || !r
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
                {
                    v.add("upstream.region", "must be an AWS region such as us-east-1");
                }
                None if crate::sigv4::region_from_url(&up.base_url).is_none() => v.add(
                    "upstream.region",
                    "is required with auth = \"sigv4\" when base_url is not https://bedrock-mantle.<region>.api.aws",
                ),
                _ => {}
            }
        }
        if up.api_key_env.is_empty() {
            v.add("upstream.api_key_env", "must name an environment variable");
        }
        check_prefix(v, "upstream.default_prefix", &up.default_prefix);
        for (i, mp) in up.model_prefixes.iter().enumerate() {
            check_glob(v, &format!("upstream.model_prefixes[{i}].model"), &mp.model);
            check_prefix(
                v,
                &format!("upstream.model_prefixes[{i}].prefix"),
                &mp.prefix,
            );
        }
        if up.connect_timeout.is_zero() {
            v.add("upstream.connect_timeout", "must be greater than 0");
        }
        for (name, d) in [
            ("idle_timeout", up.idle_timeout),
            ("total_timeout", up.total_timeout),
        ] {
            if d.is_zero() {
                v.add(format!("upstream.{name}"), "must be greater than 0");
            }
        }
        if up.retries > 10 {
            v.add("upstream.retries", "at most 10 extra attempts");
        }
        if up.response_timeout.is_zero() {
            v.add("upstream.response_timeout", "must be greater than 0");
        }
    }

    /// Returns the set of declared project names for the reference checks.
    fn validate_projects(&self, v: &mut Validator) -> HashSet<&str> {
        let mut names = HashSet::new();
        let mut ids = HashMap::new();
        for (i, p) in self.projects.iter().enumerate() {
            let path = format!("projects[{i}]");
            if p.name.trim().is_empty() {
                v.add(format!("{path}.name"), "must not be empty");
            } else if !names.insert(p.name.as_str()) {
                v.add(
                    format!("{path}.name"),
                    format!("project name `{}` is declared twice", p.name),
                );
            }
            match &p.id {
                None => v.add(
                    format!("{path}.id"),
                    format!(
                        "project `{}` has no id: set the Bedrock project ID (proj_...)",
                        p.name
                    ),
                ),
                Some(id) => {
                    if id == "default" {
                        v.add(
                            format!("{path}.id"),
                            "`default` is the account's default project, which mantlegate never bills to: \
                             give the project its own id (proj_...), or leave `id` out and let \
                             `mantlegate projects apply` create it",
                        );
                    } else if !is_project_id(id) {
                        v.add(
                            format!("{path}.id"),
                            format!(
                                "{id:?} is not a Bedrock project ID: expected proj_ followed by letters and digits"
                            ),
                        );
                    }
                    if let Some(first) = ids.insert(id.as_str(), i) {
                        v.add(
                            format!("{path}.id"),
                            format!("id {id:?} is already used by projects[{first}]"),
                        );
                    }
                }
            }
        }
        names
    }

    fn validate_attribution(&self, v: &mut Validator, names: &HashSet<&str>) {
        let a = &self.attribution;
        match (&a.on_missing, &a.default_project) {
            (OnMissing::Default, None) => v.add(
                "attribution.default_project",
                "required when on_missing = \"default\"",
            ),
            (_, Some(name)) => check_ref(v, "attribution.default_project", name, names),
            (OnMissing::Reject, None) => {}
        }
    }

    fn validate_keys(&self, v: &mut Validator, names: &HashSet<&str>) {
        let mut hashes = HashMap::new();
        for (i, k) in self.keys.iter().enumerate() {
            let path = format!("keys[{i}]");
            if k.name.trim().is_empty() {
                v.add(format!("{path}.name"), "must not be empty");
            }
            if parse_sha256(&k.sha256).is_none() {
                v.add(
                    format!("{path}.sha256"),
                    "must be 64 hex digits (the SHA-256 printed by `mantlegate keys new`), never the key itself",
                );
            } else if let Some(first) = hashes.insert(k.sha256.to_ascii_lowercase(), i) {
                v.add(
                    format!("{path}.sha256"),
                    format!("the same key is already declared as keys[{first}]"),
                );
            }
            if let Some(at) = &k.expires_at
                && at.parse::<jiff::Timestamp>().is_err()
            {
                v.add(
                    format!("{path}.expires_at"),
                    format!("`{at}` is not an RFC 3339 time such as 2027-01-31T00:00:00Z"),
                );
            }
            let mut seen = HashSet::new();
            for (j, p) in k.projects.iter().enumerate() {
                check_ref(v, &format!("{path}.projects[{j}]"), p, names);
                if !seen.insert(p) {
                    v.add(
                        format!("{path}.projects[{j}]"),
                        format!("`{p}` is listed twice"),
                    );
                }
            }
        }
    }

    fn validate_routes(&self, v: &mut Validator, names: &HashSet<&str>) {
        let mut prefixes = HashMap::new();
        for (i, r) in self.routes.iter().enumerate() {
            let path = format!("routes[{i}]");
            check_route_prefix(v, &format!("{path}.prefix"), &r.prefix);
            if let Some(first) = prefixes.insert(r.prefix.as_str(), i) {
                v.add(
                    format!("{path}.prefix"),
                    format!("`{}` is already used by routes[{first}]", r.prefix),
                );
            }
            check_ref(v, &format!("{path}.project"), &r.project, names);
        }
    }
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
            line: None,
        });
    }
}

fn check_ref(v: &mut Validator, path: &str, name: &str, names: &HashSet<&str>) {
    if !names.contains(name) {
        // Sorted, so that of two equally near names the suggestion is always the same one.
        let mut sorted: Vec<&str> = names.iter().copied().collect();
        sorted.sort_unstable();
        v.add(
            path,
            format!(
                "project `{name}` is not declared in [[projects]]{}",
                did_you_mean(name, sorted)
            ),
        );
    }
}

/// The candidate nearest to `wanted` when it is near enough to be what was meant (a typo):
/// the same but for case, or at most a third of its characters (at least one) added, removed
/// or changed, and never all of them. Ties go to the first candidate.
#[must_use]
pub fn closest<'a>(wanted: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let wanted_lower = wanted.to_lowercase();
    let bound = (wanted.chars().count() / 3).max(1);
    let mut best: Option<(usize, &str)> = None;
    for candidate in candidates {
        if candidate == wanted {
            continue;
        }
        let d = edit_distance(&wanted_lower, &candidate.to_lowercase());
        // A name changed whole is another name, not a typo of it.
        let whole = d >= wanted.chars().count().min(candidate.chars().count());
        if d <= bound && !whole && best.is_none_or(|(b, _)| d < b) {
            best = Some((d, candidate));
        }
    }
    best.map(|(_, c)| c)
}

/// `; did you mean `X`?` for [`closest`], or nothing.
#[must_use]
pub fn did_you_mean<'a>(wanted: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    closest(wanted, candidates).map_or_else(String::new, |c| format!("; did you mean `{c}`?"))
}

/// Levenshtein distance in characters (insertions, deletions and substitutions cost 1).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

fn check_prefix(v: &mut Validator, path: &str, prefix: &str) {
    if !prefix.starts_with('/') || (prefix.len() > 1 && prefix.ends_with('/')) {
        v.add(
            path,
            format!("`{prefix}` must start with `/` and not end with one, e.g. /v1"),
        );
    } else if prefix.contains(['?', '#']) || prefix.contains("//") || has_dot_segment(prefix) {
        v.add(
            path,
            format!("`{prefix}` must be a plain path with no `?`, `#`, `//` or dot segments"),
        );
    }
}

/// Paths this proxy serves itself; a route must not shadow them.
/// (`/openai` holds `/openai/v1`, the API root of the SDKs' Bedrock clients.)
const RESERVED_FIRST_SEGMENTS: [&str; 6] =
    ["v1", "openai", "admin", "healthz", "readyz", "metrics"];

fn check_route_prefix(v: &mut Validator, path: &str, prefix: &str) {
    if prefix == "/" {
        v.add(
            path,
            "`/` would capture every call: name a prefix such as /chatbot",
        );
        return;
    }
    check_prefix(v, path, prefix);
    let first = prefix
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("");
    if RESERVED_FIRST_SEGMENTS.contains(&first) {
        v.add(
            path,
            format!("`{prefix}` starts with `/{first}`, which mantlegate serves itself"),
        );
    }
    if prefix.contains('%') {
        v.add(path, format!("`{prefix}` must not contain percent-escapes"));
    }
}

fn check_glob(v: &mut Validator, path: &str, pattern: &str) {
    if pattern.is_empty() || pattern.trim_end_matches('*').contains('*') {
        v.add(
            path,
            format!("`{pattern}` must be a model name, optionally ending in a single `*`"),
        );
    }
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|s| s == "." || s == "..")
}

/// Whether `id` has the shape of a Bedrock project ID mantlegate bills to:
/// `proj_[A-Za-z0-9]+` (never the account's `default` project).
#[must_use]
pub fn is_project_id(id: &str) -> bool {
    id.strip_prefix("proj_")
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Parses a 64-digit hex SHA-256 (either case).
#[must_use]
pub fn parse_sha256(hex_digest: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut out).ok()?;
    Some(out)
}

/// Whether `model` matches `pattern`: exact, or a prefix when the pattern ends in `*`.
#[must_use]
pub fn glob_matches(pattern: &str, model: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => model.starts_with(prefix),
        None => pattern == model,
    }
}

/// Checks a `[limits] store` URL (`redis://`, `rediss://`, `redis+unix://`, `unix://`) and
/// returns it with any password hidden, for `check` and the logs.
pub fn describe_store_url(url: &str) -> Result<String, String> {
    redis::Client::open(url).map_err(|e| format!("not a usable Redis URL: {e}"))?;
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Hiding a password cannot fail on a URL that has one.
            let _ = parsed.set_password(Some("***"));
            Ok(parsed.to_string())
        }
        _ => Ok(url.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [upstream]
        base_url = "https://bedrock-mantle.us-east-1.api.aws"
    "#;

    fn problems(text: &str) -> Vec<Problem> {
        match Config::from_toml(text) {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn minimal_config_has_defaults() {
        let c = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert_eq!(c.server.max_body_bytes, 10 * 1024 * 1024);
        assert_eq!(c.upstream.default_prefix, "/v1");
        assert_eq!(c.upstream.api_key_env, "BEDROCK_API_KEY");
        assert_eq!(c.attribution.on_missing, OnMissing::Reject);
    }

    #[test]
    fn connection_limits_have_defaults_and_refuse_zero_and_absurd_values() {
        let c = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.server.idle_timeout, Duration::from_mins(1));
        assert_eq!(c.server.request_body_timeout, Duration::from_secs(30));
        assert_eq!(c.server.max_connections, None);
        let set = format!(
            "[server]\nheader_read_timeout = \"300ms\"\nidle_timeout = \"2m\"\nrequest_body_timeout = \"5s\"\nmax_connections = 20\n{MINIMAL}"
        );
        let c = Config::from_toml(&set).expect("valid");
        assert_eq!(c.server.header_read_timeout, Duration::from_millis(300));
        assert_eq!(c.server.idle_timeout, Duration::from_mins(2));
        assert_eq!(c.server.request_body_timeout, Duration::from_secs(5));
        assert_eq!(c.server.max_connections, Some(20));
        for (line, path, says) in [
            (
                "header_read_timeout = \"0s\"",
                "server.header_read_timeout",
                "greater than 0",
            ),
            (
                "idle_timeout = \"0ms\"",
                "server.idle_timeout",
                "greater than 0",
            ),
            (
                "request_body_timeout = \"0s\"",
                "server.request_body_timeout",
                "greater than 0",
            ),
            (
                "header_read_timeout = \"2h\"",
                "server.header_read_timeout",
                "at most 1h",
            ),
            (
                "idle_timeout = \"30days\"",
                "server.idle_timeout",
                "at most 1h",
            ),
            (
                "request_body_timeout = \"61m\"",
                "server.request_body_timeout",
                "at most 1h",
            ),
            (
                "max_connections = 0",
                "server.max_connections",
                "greater than 0",
            ),
            (
                "max_connections = 99999999999",
                "server.max_connections",
                "at most 10000000",
            ),
        ] {
            let p = problems(&format!("[server]\n{line}\n{MINIMAL}"));
            assert_eq!(p.len(), 1, "{line}: {p:?}");
            assert_eq!(p[0].path, path, "{line}");
            assert!(p[0].message.contains(says), "{line}: {}", p[0].message);
        }
        // Not a duration at all: a parse error naming the key.
        match Config::from_toml(&format!("[server]\nidle_timeout = 5\n{MINIMAL}")) {
            Err(ConfigError::Parse(msg)) => assert!(msg.contains("idle_timeout"), "{msg}"),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn unknown_fields_are_errors() {
        let text = format!("{MINIMAL}\n[attribution]\non_misssing = \"default\"\n");
        match Config::from_toml(&text) {
            Err(ConfigError::Parse(msg)) => assert!(msg.contains("on_misssing"), "{msg}"),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = format!(
            r#"{MINIMAL}
            [attribution]
            on_missing = "default"
            [[projects]]
            name = "A"
            id = "proj_1"
            [[projects]]
            name = "A"
            id = "bogus"
            [[projects]]
            name = "B"
            id = "proj_1"
            [[keys]]
            name = "k"
            sha256 = "mg-plaintext"
            projects = ["Nope"]
            [[routes]]
            prefix = "/v1"
            project = "Missing"
            "#
        );
        let paths: Vec<String> = problems(&text).into_iter().map(|p| p.path).collect();
        for expected in [
            "projects[1].name",
            "projects[1].id",
            "projects[2].id",
            "attribution.default_project",
            "keys[0].sha256",
            "keys[0].projects[0]",
            "routes[0].prefix",
            "routes[0].project",
        ] {
            assert!(
                paths.iter().any(|p| p == expected),
                "{expected} missing from {paths:?}"
            );
        }
    }

    #[test]
    fn routes_must_not_shadow_the_api_roots_or_mantlegates_own_paths() {
        let with_route = |prefix: &str| {
            format!(
                "{MINIMAL}\n[[projects]]\nname = \"A\"\nid = \"proj_1\"\n\
                 [[routes]]\nprefix = \"{prefix}\"\nproject = \"A\"\n"
            )
        };
        for prefix in ["/v1", "/openai", "/openai/v1", "/admin/app", "/metrics"] {
            let found = problems(&with_route(prefix));
            assert_eq!(found.len(), 1, "{prefix}: {found:?}");
            assert_eq!(found[0].path, "routes[0].prefix");
            assert!(
                found[0].message.contains("which mantlegate serves itself"),
                "{prefix}: {}",
                found[0].message
            );
        }
        for prefix in ["/openai-bot", "/chatbot/openai", "/v1app"] {
            assert!(
                Config::from_toml(&with_route(prefix)).is_ok(),
                "{prefix} should be a valid route"
            );
        }
    }

    #[test]
    fn the_rate_limit_store_is_a_redis_url() {
        let ok = format!("{MINIMAL}\n[limits]\nstore = \"rediss://:pw@redis.internal:6380/1\"\n");
        let config = Config::from_toml(&ok).expect("valid");
        assert_eq!(
            config.limits.store.as_deref(),
            Some("rediss://:pw@redis.internal:6380/1")
        );
        assert_eq!(
            Config::from_toml(MINIMAL).expect("valid").limits.store,
            None
        );
        let bad = format!("{MINIMAL}\n[limits]\nstore = \"http://redis.internal\"\n");
        let paths: Vec<String> = problems(&bad).into_iter().map(|p| p.path).collect();
        assert_eq!(paths, ["limits.store"]);
    }

    #[test]
    fn the_webhook_is_an_http_url_never_echoed_with_a_timeout_of_ten_seconds() {
        let c = Config::from_toml(MINIMAL).expect("valid");
        assert!(c.alerts.webhook_url.is_none());
        assert_eq!(c.alerts.webhook_timeout, Duration::from_secs(10));
        let ok = format!(
            "{MINIMAL}\n[alerts]\nwebhook_url = \"https://hooks.example.com/t/SECRET\"\nwebhook_timeout = \"250ms\"\n"
        );
        let c = Config::from_toml(&ok).expect("valid");
        assert_eq!(c.alerts.webhook_timeout, Duration::from_millis(250));
        assert!(
            !format!("{c:?}").contains("SECRET"),
            "the URL never in Debug"
        );
        for (lines, path) in [
            ("webhook_url = \"ftp://h/SECRET\"", "alerts.webhook_url"),
            ("webhook_url = \"SECRET\"", "alerts.webhook_url"),
            ("webhook_timeout = \"0s\"", "alerts.webhook_timeout"),
            ("webhook_timeout = \"2m\"", "alerts.webhook_timeout"),
        ] {
            let found = problems(&format!("{MINIMAL}\n[alerts]\n{lines}\n"));
            assert_eq!(
                found.iter().map(|p| p.path.as_str()).collect::<Vec<_>>(),
                [path],
                "{lines}"
            );
            assert!(!found[0].to_string().contains("SECRET"), "{}", found[0]);
        }
    }

    #[test]
    fn tag_policy_violations_of_every_kind() {
        let text = format!(
            r#"{MINIMAL}
            [policy]
            required_tags = ["Team", "CostCenter"]
            [policy.allowed_values]
            Environment = ["Production", "Staging"]
            [policy.patterns]
            CostCenter = "^CC-[0-9]{{4}}$"
            [[projects]]
            name = "Good"
            id = "proj_good"
            tags = {{ Team = "CX", CostCenter = "CC-1001", Environment = "Production" }}
            [[projects]]
            name = "Bad"
            id = "proj_bad"
            tags = {{ CostCenter = "1001", Environment = "prod", "aws:owner" = "x", Note = "a;b" }}
            "#
        );
        let found: Vec<String> = problems(&text)
            .into_iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect();
        let expect = [
            "projects[1].tags: project `Bad` lacks the required tag `Team`",
            "projects[1].tags.Environment: project `Bad`: `prod` is not an allowed Environment",
            "projects[1].tags.CostCenter: project `Bad`: `1001` does not match the CostCenter pattern",
            "projects[1].tags.aws:owner: project `Bad`: tag key `aws:owner` starts with `aws:`",
            "projects[1].tags.Note: project `Bad`: the value of tag `Note` contains `;`",
        ];
        for e in expect {
            assert!(
                found.iter().any(|f| f.starts_with(e)),
                "{e}\nnot in {found:#?}"
            );
        }
        assert!(!found.iter().any(|f| f.contains("`Good`")), "{found:#?}");
        assert_eq!(found.len(), expect.len(), "{found:#?}");
    }

    #[test]
    fn governance_entries_are_checked() {
        let text = format!(
            r#"{MINIMAL}
            [[projects]]
            name = "P"
            id = "proj_p"
            [[budgets]]
            name = "b"
            monthly_usd = "-3"
            timezone = "Mars/Olympus"
            [[rate_limits]]
            key = "ghost"
            "#
        );
        let paths: Vec<String> = problems(&text).into_iter().map(|p| p.path).collect();
        for expected in [
            "budgets[0]",
            "budgets[0].monthly_usd",
            "budgets[0].timezone",
            "rate_limits[0].key",
            "rate_limits[0]",
        ] {
            assert!(
                paths.iter().any(|p| p == expected),
                "{expected} missing from {paths:?}"
            );
        }
    }

    #[test]
    fn token_variables_must_be_named() {
        let text = format!(
            r#"{MINIMAL}
            [admin]
            token_env = ""
            [metrics]
            token_env = ""
            "#
        );
        let paths: Vec<String> = problems(&text).into_iter().map(|p| p.path).collect();
        assert_eq!(paths, ["admin.token_env", "metrics.token_env"]);
        let text = format!("{MINIMAL}\n[metrics]\ntoken_env = \"MG_METRICS_TOKEN\"\n");
        let config = Config::from_toml(&text).expect("valid");
        assert_eq!(
            config.metrics.token_env.as_deref(),
            Some("MG_METRICS_TOKEN")
        );
    }

    #[test]
    fn project_ids() {
        assert!(is_project_id("proj_5d5ykleja6cwpirysbb7"));
        assert!(!is_project_id("default"));
        assert!(!is_project_id("proj_a\n"));
        assert!(!is_project_id("proj_a\u{1b}[31m"));
        assert!(!is_project_id("proj_"));
        assert!(!is_project_id("proj-1"));
        assert!(!is_project_id("proj_a b"));
    }

    #[test]
    fn a_project_id_is_proj_and_letters_and_digits_never_default() {
        let with = |id: &str| {
            format!(
                "{MINIMAL}\n[[projects]]\nname = \"A\"\nid = {}\n[[projects]]\nname = \"B\"\nid = \"proj_b\"\n",
                toml::Value::String(id.to_owned())
            )
        };
        Config::from_toml(&with("proj_a1")).expect("valid");
        let p = problems(&with("default"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].path, "projects[0].id");
        assert!(
            p[0].message
                .contains("`default` is the account's default project"),
            "{p:?}"
        );
        for bad in [
            "proj_a\n",
            "proj_a\u{1b}[31m",
            " proj_a",
            "proj_a b",
            "PROJ_a",
            "",
        ] {
            let p = problems(&with(bad));
            assert_eq!(p.len(), 1, "{bad:?}: {p:?}");
            assert_eq!(p[0].path, "projects[0].id");
            assert!(
                p[0].message.starts_with(&format!("{bad:?} is not")),
                "{p:?}"
            );
            assert!(!p[0].message.contains('\u{1b}') && !p[0].message.contains('\n'));
        }
        let p = problems(&with("proj_b"));
        assert!(
            p[0].message
                .contains("\"proj_b\" is already used by projects[0]"),
            "{p:?}"
        );
    }

    #[test]
    fn closest_suggests_typos_never_other_names() {
        let names = ["payments", "search", "Team"];
        assert_eq!(closest("paymnts", names), Some("payments"));
        assert_eq!(closest("Payments", names), Some("payments"));
        assert_eq!(closest("paymentss", names), Some("payments"));
        assert_eq!(closest("Teams", names), Some("Team"));
        assert_eq!(closest("search", names), None, "itself is no suggestion");
        assert_eq!(closest("billing", names), None);
        assert_eq!(
            closest("c", ["a"]),
            None,
            "a name changed whole is another name"
        );
        assert_eq!(closest("", names), None);
        assert_eq!(did_you_mean("serch", names), "; did you mean `search`?");
        assert_eq!(did_you_mean("zzz", names), "");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("é", "e"), 1, "characters, not bytes");
    }

    #[test]
    fn problems_carry_the_line_their_path_leads_to() {
        let text = r#"[upstream]
base_url = "https://x"

[[projects]]
name = "payments"
id = "proj_1"
tags = { Team = "A", "bad!" = "x" }

[[keys]]
name = "a"
sha256 = "zz"
projects = ["payments"]

[[keys]]
name = "b"
sha256 = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
projects = [
  "payments",
  "paymnts",
]

[attribution]
on_missing = "default"

[[budgets]]
name = "x"
project = "Payments"
monthly_usd = "5"
"#;
        let Err(ConfigError::Invalid(problems)) = Config::from_toml(text) else {
            panic!("invalid");
        };
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        for expected in [
            "keys[0].sha256 (line 11): must be 64 hex digits",
            "keys[1].projects[1] (line 19): project `paymnts` is not declared in [[projects]]; did you mean `payments`?",
            "projects[0].tags.bad! (line 7): project `payments`: tag key `bad!`",
            // A field that is missing: the line of the table that should hold it.
            "attribution.default_project (line 22): required",
            "budgets[0].project (line 27): project `Payments` is not declared in [[projects]]; did you mean `payments`?",
        ] {
            assert!(
                shown.iter().any(|s| s.starts_with(expected)),
                "{expected:?} not in {shown:#?}"
            );
        }
        // A path the file does not have (a price file's) has no line.
        assert!(steps("builtin: prices[0].model").is_none());
        let doc = toml_edit::Document::parse("a = 1\n").expect("toml");
        assert_eq!(offset_of(doc.as_item(), "nothing.here[3]"), None);
        assert_eq!(
            offset_of(doc.as_item(), "a[0]").map(|o| line_at("a = 1\n", o)),
            Some(1)
        );
    }

    #[test]
    fn globs() {
        assert!(glob_matches("openai.gpt-5*", "openai.gpt-5.4"));
        assert!(!glob_matches("openai.gpt-5*", "openai.gpt-oss-120b"));
        assert!(glob_matches("openai.gpt-oss-120b", "openai.gpt-oss-120b"));
        assert!(!glob_matches(
            "openai.gpt-oss-120b",
            "openai.gpt-oss-120b-x"
        ));
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../config/mantlegate.example.toml");
        let config = Config::from_toml(text).expect("the example config is valid");
        assert!(!config.projects.is_empty());
        assert!(!config.keys.is_empty());
        assert!(!config.routes.is_empty());
        assert!(!config.upstream.model_prefixes.is_empty());
    }

    #[test]
    fn a_file_read_while_it_changes_is_read_until_two_reads_agree() {
        let reads = |versions: &[&str]| {
            let mut next = versions.iter().map(|v| v.as_bytes().to_vec());
            let mut count = 0;
            let got = read_stable(|| {
                count += 1;
                Ok(next.next().unwrap_or_default())
            });
            (got.map_err(|e| e.to_string()), count)
        };
        // Half written, then whole twice: the whole file.
        assert_eq!(
            reads(&[
                "[upstream]\n",
                "[upstream]\nbase_url = 1\n",
                "[upstream]\nbase_url = 1\n"
            ]),
            (Ok(b"[upstream]\nbase_url = 1\n".to_vec()), 3)
        );
        assert_eq!(reads(&["a", "a"]), (Ok(b"a".to_vec()), 2));
        // Never twice the same: given up after a bounded number of reads.
        let (got, count) = reads(&["1", "2", "3", "4", "5", "6", "7", "8"]);
        assert!(got.is_err_and(|e| e.contains("changed while being read")));
        assert_eq!(count, READ_ATTEMPTS + 1);
    }

    #[cfg(unix)]
    #[test]
    fn only_a_regular_file_within_the_limit_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "[upstream]\n").expect("write");
        assert_eq!(read_file(&good).expect("read"), b"[upstream]\n");
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&good, &link).expect("symlink");
        assert_eq!(
            read_file(&link).expect("a symlink to a file"),
            b"[upstream]\n"
        );

        let zero = dir.path().join("zero.toml");
        std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
        let err = read_file(&zero).expect_err("a device");
        assert!(
            err.to_string()
                .contains("not a regular file (it is a character device)"),
            "{err}"
        );

        let fifo = dir.path().join("fifo.toml");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        // Refused at once: nothing writes to the FIFO, a blocking open would wait forever.
        let err = read_file(&fifo).expect_err("a FIFO");
        assert!(
            err.to_string()
                .contains("not a regular file (it is a FIFO)"),
            "{err}"
        );

        let err = read_file(dir.path()).expect_err("a directory");
        assert!(err.to_string().contains("it is a directory"), "{err}");

        let big = dir.path().join("big.toml");
        let file = std::fs::File::create(&big).expect("create");
        file.set_len(MAX_FILE_BYTES + 1).expect("sparse");
        let err = read_file(&big).expect_err("too large");
        assert!(
            err.to_string().contains("larger than the 1048576 bytes"),
            "{err}"
        );
        file.set_len(MAX_FILE_BYTES).expect("sparse");
        assert_eq!(read_file(&big).expect("at the limit").len(), 1 << 20);

        match Config::load(&zero) {
            Err(ConfigError::Read { .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn urls_are_checked_and_passwords_hidden() {
        assert_eq!(
            describe_store_url("redis://127.0.0.1:6379/2").as_deref(),
            Ok("redis://127.0.0.1:6379/2")
        );
        assert_eq!(
            describe_store_url("redis://default:s3cret@redis.internal:6379").as_deref(),
            Ok("redis://default:***@redis.internal:6379")
        );
        assert!(describe_store_url("rediss://redis.internal:6380").is_ok());
        assert!(describe_store_url("http://redis.internal").is_err());
        assert!(describe_store_url("not a url").is_err());
    }
}
