//! Shared state: the compiled config snapshot (swapped whole), the upstream HTTP client.

mod responses;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::http::HeaderValue;
use sha2::{Digest, Sha256};

use crate::budget::Budgets;
use crate::config::{Config, OnMissing, glob_matches, parse_sha256};
use crate::ledger::Ledger;
use crate::ledger::LedgerRead;
use crate::metrics::{Metrics, TagLabels};
use crate::pricing::PriceTable;
use crate::ratelimit::{RateLimiter, RateRule};
use crate::secret::Secret;
pub use responses::{OWNER_TTL, PendingBackground, ResponseIndex};

/// Index of a project in [`Snapshot::projects`].
pub type ProjectIdx = usize;

/// A project as the request path needs it.
#[derive(Debug)]
pub struct Project {
    /// Config handle.
    pub name: Arc<str>,
    /// Bedrock project ID.
    pub id: Arc<str>,
    /// `id` ready to send as the `OpenAI-Project` header.
    pub id_header: HeaderValue,
    /// Cost allocation tags.
    pub tags: BTreeMap<String, String>,
    /// `tags` as a JSON object, for ledger records.
    pub tags_json: Arc<str>,
    /// The tags exported as metric labels.
    pub metric_tags: TagLabels,
    /// Its calls' metric handles, found once per kind of call.
    pub metric_handles: crate::metrics::HandleCache,
    /// Budgets its calls fall under (indices into [`Snapshot::budgets`]).
    pub budgets: Vec<usize>,
    /// Rate-limit rules on it (indices into the limiter's rules).
    pub rate_rules: Vec<usize>,
}

/// A caller key (found by its SHA-256).
#[derive(Debug)]
pub struct Key {
    /// Name for logs and errors.
    pub name: Arc<str>,
    /// Projects it may use; the first is its default.
    pub projects: Vec<ProjectIdx>,
    /// Rate-limit rules on it (indices into the limiter's rules).
    pub rate_rules: Vec<usize>,
    /// When it stops working.
    pub expires_at: Option<jiff::Timestamp>,
    /// Whether it is disabled.
    pub disabled: bool,
    /// Forward the caller's own key upstream instead of mantlegate's.
    pub passthrough: bool,
    /// First 12 hex digits of its SHA-256 (tells rotated secrets apart in the ledger).
    pub fingerprint: Arc<str>,
}

/// A path prefix attributed to one project.
#[derive(Debug)]
pub struct Route {
    /// e.g. `/chatbot`, never ending in `/`.
    pub prefix: Arc<str>,
    /// The project of every call through it.
    pub project: ProjectIdx,
}

/// Where and how calls are forwarded.
#[derive(Debug)]
pub struct Upstream {
    /// Scheme, host and optional path prefix, without a trailing `/`.
    pub base: String,
    /// `base` parsed once: a call's URI is its scheme and host with the call's path.
    pub origin: crate::upstream::Origin,
    /// Prefix for models without a specific one.
    pub default_prefix: String,
    /// `(model glob, prefix)`, first match wins.
    pub model_prefixes: Vec<(String, String)>,
    /// `Bearer <key>` sent upstream, when a key is configured.
    pub authorization: Option<Secret<HeaderValue>>,
    /// Time allowed for the response head.
    pub response_timeout: Duration,
    /// Longest gap between body frames.
    pub idle_timeout: Duration,
    /// Longest whole call.
    pub total_timeout: Duration,
    /// Extra attempts before the first byte.
    pub retries: u32,
    /// First retry delay.
    pub retry_backoff: Duration,
    /// Longest retry delay.
    pub retry_max_delay: Duration,
}

impl Upstream {
    /// The path prefix a model is served under.
    #[must_use]
    pub fn prefix_for(&self, model: Option<&str>) -> &str {
        model
            .and_then(|m| {
                self.model_prefixes
                    .iter()
                    .find(|(glob, _)| glob_matches(glob, m))
            })
            .map_or(self.default_prefix.as_str(), |(_, prefix)| prefix.as_str())
    }
}

/// A validated config compiled for lookups. A call is admitted under the snapshot current once
/// its body is in, and keeps that one to its settlement.
#[derive(Debug)]
pub struct Snapshot {
    /// All projects, in config order.
    pub projects: Vec<Project>,
    /// Project by id and by name (what a client may send in `OpenAI-Project`).
    by_handle: HashMap<Arc<str>, ProjectIdx>,
    /// Keys by SHA-256 (looked up on every call: foldhash, not the standard `SipHash`).
    keys: HashMap<[u8; 32], Key, foldhash::fast::RandomState>,
    /// Routes, longest prefix first.
    pub routes: Vec<Route>,
    /// Forwarding settings.
    pub upstream: Upstream,
    /// The project of calls that resolve to none, when `on_missing = "default"`.
    pub fallback_project: Option<ProjectIdx>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Most calls in flight.
    pub max_in_flight: usize,
    /// How long connections may stay silent or idle, how many may be open, how long a request
    /// body may take.
    pub connections: crate::server::Limits,
    /// Number of `[[keys]]` entries.
    pub key_count: usize,
    /// Model prices.
    pub prices: PriceTable,
    /// Tag labels of calls without a project.
    pub no_tags: TagLabels,
    /// Budgets with their live month-to-date state.
    pub budgets: Budgets,
    /// Rate limiter over `[[rate_limits]]` (rule i = entry i).
    pub limiter: RateLimiter,
    /// The `[[rate_limits]]` the limiter was built from (a reload with the same rules keeps
    /// the limiter and its state).
    pub rate_limit_config: Vec<crate::config::RateLimitConfig>,
    /// The shared rate-limit store (`[limits] store`), set at start and kept across reloads;
    /// None: limits per replica.
    pub rate_store: Option<crate::ratelimit::redis::RedisBackend>,
    /// Output tokens assumed when a call sets no cap and its price row states no ceiling.
    pub default_max_output_tokens: u64,
    /// SHA-256 of the token in `[metrics] token_env`'s variable, which may read `/metrics`
    /// on the main listener (None: unset, or the variable is empty or missing).
    pub metrics_token_sha256: Option<[u8; 32]>,
    /// Where budget alerts are sent (one JSON `POST` each, through the outbox).
    pub alert_webhook: Option<crate::webhook::Webhook>,
    /// How long one webhook attempt may take.
    pub alert_timeout: Duration,
}

fn rate_rules_of(
    config: &Config,
    pick: impl Fn(&crate::config::RateLimitConfig) -> bool,
) -> Vec<usize> {
    config
        .rate_limits
        .iter()
        .enumerate()
        .filter(|(_, r)| pick(r))
        .map(|(i, _)| i)
        .collect()
}

impl Snapshot {
    /// Keeps the rate limits in `store` (shared by the fleet) instead of in this process:
    /// called at start with the backend of `[limits] store`, and by reloads with the same one.
    pub fn share_rate_limits(&mut self, store: &crate::ratelimit::redis::RedisBackend) {
        let rules = crate::ratelimit::redis::rule_identities(&self.rate_limit_config);
        self.limiter = store.limiter(&rules);
        self.rate_store = Some(store.clone());
    }
}

impl Snapshot {
    /// Compiles a validated config. `upstream_key` is the Bedrock API key (None: not configured).
    ///
    /// # Errors
    /// Fails only on values `Config::validate` accepts but HTTP cannot carry (e.g. a key with
    /// control characters).
    #[expect(
        clippy::too_many_lines,
        reason = "one field after another of the compiled config"
    )]
    pub fn build(config: &Config, upstream_key: Option<&str>) -> anyhow::Result<Self> {
        let mut projects = Vec::with_capacity(config.projects.len());
        let mut by_handle = HashMap::new();
        for (i, p) in config.projects.iter().enumerate() {
            let id =
                p.id.as_deref()
                    .ok_or_else(|| anyhow::anyhow!("project `{}` has no id", p.name))?;
            let metric_tags = config
                .metrics
                .tag_labels
                .iter()
                .map(|t| {
                    (
                        Arc::from(format!("tag_{t}")),
                        Arc::from(p.tags.get(t).map_or("", String::as_str)),
                    )
                })
                .collect();
            let project = Project {
                name: p.name.as_str().into(),
                id: id.into(),
                id_header: HeaderValue::from_str(id)?,
                tags: p.tags.clone(),
                tags_json: serde_json::to_string(&p.tags)?.into(),
                metric_tags,
                metric_handles: crate::metrics::HandleCache::default(),
                budgets: Vec::new(),
                rate_rules: rate_rules_of(config, |r| r.project.as_deref() == Some(&p.name)),
            };
            by_handle.insert(project.id.clone(), i);
            by_handle.insert(project.name.clone(), i);
            projects.push(project);
        }
        let index = |name: &str| {
            config
                .projects
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| anyhow::anyhow!("project `{name}` is not declared"))
        };
        let mut keys = HashMap::with_capacity_and_hasher(
            config.keys.len(),
            foldhash::fast::RandomState::default(),
        );
        for k in &config.keys {
            let hash = parse_sha256(&k.sha256)
                .ok_or_else(|| anyhow::anyhow!("key `{}` has no valid sha256", k.name))?;
            let projects = k
                .projects
                .iter()
                .map(|p| index(p))
                .collect::<anyhow::Result<_>>()?;
            keys.insert(
                hash,
                Key {
                    name: k.name.as_str().into(),
                    projects,
                    rate_rules: rate_rules_of(config, |r| r.key.as_deref() == Some(&k.name)),
                    expires_at: k.expires_at.as_deref().and_then(|t| t.parse().ok()),
                    disabled: k.disabled,
                    passthrough: k.passthrough,
                    fingerprint: k.sha256.get(..12).unwrap_or("").to_ascii_lowercase().into(),
                },
            );
        }
        let mut routes = config
            .routes
            .iter()
            .map(|r| {
                Ok(Route {
                    prefix: r.prefix.as_str().into(),
                    project: index(&r.project)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let fallback_project = match config.attribution.on_missing {
            OnMissing::Reject => None,
            OnMissing::Default => Some(index(
                config.attribution.default_project.as_deref().unwrap_or(""),
            )?),
        };
        let authorization = upstream_key
            .map(|k| {
                let mut v = HeaderValue::from_str(&format!("Bearer {k}")).map_err(|_| {
                    anyhow::anyhow!("the upstream API key contains characters HTTP cannot carry")
                })?;
                v.set_sensitive(true);
                Ok::<_, anyhow::Error>(Secret::new(v))
            })
            .transpose()?;
        let now_ms = jiff::Timestamp::now().as_millisecond();
        let budgets = Budgets::from_config(config, now_ms)?;
        for project in &mut projects {
            project.budgets = budgets.applicable(&project.name, &project.tags);
        }
        let up = &config.upstream;
        Ok(Self {
            projects,
            by_handle,
            key_count: config.keys.len(),
            keys,
            routes,
            upstream: Upstream {
                base: up.base_url.trim_end_matches('/').to_owned(),
                origin: crate::upstream::Origin::parse(&up.base_url)?,
                default_prefix: up.default_prefix.clone(),
                model_prefixes: up
                    .model_prefixes
                    .iter()
                    .map(|m| (m.model.clone(), m.prefix.clone()))
                    .collect(),
                authorization,
                response_timeout: up.response_timeout,
                idle_timeout: up.idle_timeout,
                total_timeout: up.total_timeout,
                retries: up.retries,
                retry_backoff: up.retry_backoff,
                retry_max_delay: up.retry_max_delay,
            },
            fallback_project,
            max_body_bytes: config.server.max_body_bytes,
            max_in_flight: config.server.max_in_flight,
            connections: crate::server::Limits::of(&config.server),
            prices: config
                .price_table()
                .map_err(|p| anyhow::anyhow!("invalid prices: {}", p.len()))?,
            budgets,
            limiter: RateLimiter::new(
                config
                    .rate_limits
                    .iter()
                    .map(|r| RateRule {
                        requests_per_minute: r.requests_per_minute,
                        tokens_per_minute: r.tokens_per_minute,
                    })
                    .collect(),
            ),
            rate_limit_config: config.rate_limits.clone(),
            rate_store: None,
            default_max_output_tokens: config.limits.default_max_output_tokens,
            metrics_token_sha256: config
                .metrics
                .token_env
                .as_deref()
                .and_then(|var| std::env::var(var).ok())
                .filter(|token| !token.is_empty())
                .map(|token| Sha256::digest(token.as_bytes()).into()),
            alert_webhook: match &config.alerts.webhook_url {
                Some(url) => {
                    Some(crate::webhook::Webhook::parse(url.expose()).ok_or_else(|| {
                        anyhow::anyhow!("alerts.webhook_url is not an http(s) URL")
                    })?)
                }
                None => None,
            },
            alert_timeout: config.alerts.webhook_timeout,
            no_tags: config
                .metrics
                .tag_labels
                .iter()
                .map(|t| (Arc::from(format!("tag_{t}")), Arc::from("")))
                .collect(),
        })
    }

    /// The key whose SHA-256 is `hash`.
    #[must_use]
    pub fn key(&self, hash: &[u8; 32]) -> Option<&Key> {
        // A hash-map lookup on the digest, not a comparison of secrets: the digest of an
        // unknown key reveals nothing about a known one, so timing cannot leak a key.
        self.keys.get(hash)
    }

    /// Every key (two entries share a name while a key is rotated), in no particular order.
    pub fn keys_iter(&self) -> impl Iterator<Item = &Key> {
        self.keys.values()
    }

    /// The project a client names in `OpenAI-Project` (by id or by name).
    #[must_use]
    pub fn project_by_handle(&self, handle: &str) -> Option<ProjectIdx> {
        self.by_handle.get(handle).copied()
    }

    /// The route whose prefix `path` starts with (followed by `/`), longest first.
    #[must_use]
    pub fn route_for(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| {
            path.strip_prefix(&*r.prefix)
                .is_some_and(|rest| rest.starts_with('/'))
        })
    }
}

/// Cheap-clone handles shared by every request.
#[derive(Clone)]
pub struct AppState {
    /// The live config; swapped whole on reload.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Pooled client to the upstream.
    pub upstream: crate::upstream::UpstreamClient,
    /// Client for everything else (alert webhooks). It follows no redirect.
    pub client: reqwest::Client,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// The ledger writer's queue (None: no ledger, e.g. in some tests).
    pub ledger: Option<Ledger>,
    /// Read access to the ledger, for response-id lookups and reports.
    pub reader: Option<Arc<dyn LedgerRead>>,
    /// The owners of Responses objects created through this process, and the background
    /// responses not yet metered.
    pub responses: Arc<ResponseIndex>,
    /// The admin API bearer token (None: the admin API is off).
    pub admin_token: Option<Arc<Secret<String>>>,
    /// Calls in flight now (admission against `max_in_flight`).
    pub in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Signs upstream calls when `upstream.auth = "sigv4"` (None: API-key mode).
    pub signer: Option<crate::sigv4::Signer>,
    /// The `PostgreSQL` ledger replicas share, for what only a fleet needs: responses created
    /// through another replica, background responses pending there (None: alone).
    pub fleet: Option<Arc<crate::ledger::postgres::PgFleet>>,
    /// Budget alerts raised and not yet in the outbox (queued without waiting).
    pub alerts: crate::webhook::Alerts,
    /// Where alerts wait for their webhook: the ledger's outbox (in memory without a ledger).
    pub outbox: Arc<dyn crate::ledger::outbox::Outbox>,
}

impl AppState {
    /// Builds the state for a compiled snapshot.
    ///
    /// # Errors
    /// Fails when the HTTP client cannot be built (TLS roots unavailable).
    pub fn new(snapshot: Snapshot, connect_timeout: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_mins(1))
            // The proxy forwards exactly what it is given; it never follows redirects itself.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            upstream: crate::upstream::client(connect_timeout)?,
            client,
            metrics: Arc::new(Metrics::new()),
            ledger: None,
            reader: None,
            responses: Arc::new(ResponseIndex::default()),
            admin_token: None,
            in_flight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            signer: None,
            fleet: None,
            alerts: crate::webhook::Alerts::default(),
            outbox: Arc::new(crate::ledger::outbox::MemoryOutbox::default()),
        })
    }
}
