//! Projects as code: plan and apply the config's `[[projects]]` against bedrock-mantle's Projects API.
//!
//! The shape follows `terraform plan`/`apply`: [`plan`] is a pure diff of the config against the
//! account, [`render`] prints it, [`apply`] runs it through [`Api`], and [`write_ids`] puts the
//! ids of new projects back into the config file with `toml_edit`, keeping its comments and layout.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use axum::http::HeaderValue;
use reqwest::{Method, StatusCode, Url};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::{Config, ConfigError, ProjectConfig};
use crate::secret::Secret;
use crate::state::Snapshot;

/// Projects an account may hold (Bedrock's documented quota).
pub const MAX_PROJECTS: usize = 1000;

/// Id of the project every account has, which cannot be changed or archived.
pub const DEFAULT_PROJECT_ID: &str = "default";

/// Projects asked for per list page (the API's maximum).
const PAGE_LIMIT: usize = 100;

/// Pages read before the listing is considered broken (a cursor that never ends).
const MAX_PAGES: usize = 1000;

/// Time allowed for one Projects API call, answer read whole (an [`Api`] may be given
/// another with [`Api::with_call_timeout`]).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest answer read from the Projects API: a page of 100 projects is tens of kilobytes.
pub const MAX_ANSWER_BYTES: usize = 16 << 20;

/// Whether `id` is an id the Projects API may give a project mantlegate manages (and writes
/// into the config): `proj_` and letters and digits, never the account's `default`.
#[must_use]
pub fn is_managed_id(id: &str) -> bool {
    crate::config::is_project_id(id)
}

/// Text from the API (a name, a message) made safe to print: control characters and the
/// characters that reorder a terminal line (bidirectional overrides) are escaped as `\u{..}`
/// (`\n`, `\t`...), so an answer cannot forge lines in the plan an operator reviews.
#[must_use]
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else if matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

/// A project as the Projects API returns it (only the fields the plan needs).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct UpstreamProject {
    /// `proj_...`, or `default`.
    pub id: String,
    /// Display name (not unique: everything is keyed on `id`).
    #[serde(default)]
    pub name: Option<String>,
    /// `active` or `archived`.
    #[serde(default)]
    pub status: Option<String>,
    /// Cost allocation tags (absent or `null`: none).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub tags: BTreeMap<String, String>,
    /// When it was archived (Unix seconds), if it was.
    #[serde(default)]
    pub archived_at: Option<i64>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    Ok(Option::deserialize(d)?.unwrap_or_default())
}

impl UpstreamProject {
    /// Whether it can still be used (not archived).
    #[must_use]
    pub fn is_active(&self) -> bool {
        self.archived_at.is_none() && self.status.as_deref() != Some("archived")
    }

    fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create a project (the config has no id for it, or its id is not an active project).
    Create {
        /// Config name, sent as the project's name.
        name: String,
        /// Tags it is created with.
        tags: BTreeMap<String, String>,
        /// The id the config names that is not an active project in the account; the new id
        /// replaces it in the file.
        stale_id: Option<String>,
    },
    /// Change tags with `add_tags` and `remove_tag_keys` (there is no replace-all).
    UpdateTags {
        /// Project id.
        id: String,
        /// Config name.
        name: String,
        /// Tags to set: new keys and keys whose value changes.
        add: BTreeMap<String, String>,
        /// Tag keys to remove.
        remove: Vec<String>,
        /// Current values of the keys in `add` that exist upstream (for display only).
        was: BTreeMap<String, String>,
    },
    /// Archive a project that is in the account but not in the config (`--archive-missing`).
    Archive {
        /// Project id.
        id: String,
        /// Its upstream name.
        name: String,
    },
    /// A project in the account but not in the config, left alone.
    Unmanaged {
        /// Project id.
        id: String,
        /// Its upstream name.
        name: String,
    },
}

impl Action {
    /// Whether it changes the account (everything but [`Action::Unmanaged`]).
    #[must_use]
    pub fn is_change(&self) -> bool {
        !matches!(self, Self::Unmanaged { .. })
    }
}

impl fmt::Display for Action {
    /// A short description, for progress and error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Create { name, .. } => write!(f, "create project `{}`", printable(name)),
            Self::UpdateTags { id, name, .. } => {
                write!(f, "update the tags of `{}` ({id})", printable(name))
            }
            Self::Archive { id, name } => write!(f, "archive `{}` ({id})", printable(name)),
            Self::Unmanaged { id, name } => write!(f, "leave `{}` ({id}) alone", printable(name)),
        }
    }
}

/// What it takes to make the account match the config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Creates first, then tag updates, archives, and unmanaged projects last.
    pub actions: Vec<Action>,
    /// Things the operator should know that are not actions (e.g. a likely duplicate).
    pub warnings: Vec<String>,
    /// Active projects in the account when planned (for the project quota).
    pub active_upstream: usize,
    /// Every id in the account (archived ones too) and in the config: a created project
    /// answered with one of these is refused.
    pub taken_ids: BTreeSet<String>,
}

impl Plan {
    /// Whether applying it would change nothing.
    #[must_use]
    pub fn has_changes(&self) -> bool {
        self.actions.iter().any(Action::is_change)
    }

    /// Number of projects it creates.
    #[must_use]
    pub fn creates(&self) -> usize {
        self.actions
            .iter()
            .filter(|a| matches!(a, Action::Create { .. }))
            .count()
    }

    /// Refuses a plan that would take the account past [`MAX_PROJECTS`] active projects.
    ///
    /// # Errors
    /// The message says how many exist, how many would be created and what to do.
    pub fn check_quota(&self) -> anyhow::Result<()> {
        let creates = self.creates();
        if self.active_upstream + creates > MAX_PROJECTS {
            anyhow::bail!(
                "refusing to apply: the account has {} active project(s) and the plan creates {creates}, \
                 which is more than the {MAX_PROJECTS} projects Bedrock allows per account; \
                 remove projects from the config or archive unused ones first (nothing was changed)",
                self.active_upstream
            );
        }
        Ok(())
    }
}

/// Compares the config's projects with the account's and returns the steps to reconcile them.
///
/// Archived upstream projects count as absent. The `default` project is never created, changed
/// or archived. Upstream projects that no config entry names by id are archived when
/// `archive_missing`, otherwise reported as unmanaged.
#[must_use]
pub fn plan(config: &[ProjectConfig], upstream: &[UpstreamProject], archive_missing: bool) -> Plan {
    let active: Vec<&UpstreamProject> = upstream.iter().filter(|p| p.is_active()).collect();
    let by_id: HashMap<&str, &UpstreamProject> =
        active.iter().map(|p| (p.id.as_str(), *p)).collect();
    let mut out = Plan {
        active_upstream: by_id.len(),
        taken_ids: upstream
            .iter()
            .map(|p| p.id.clone())
            .chain(config.iter().filter_map(|p| p.id.clone()))
            .collect(),
        ..Plan::default()
    };
    let mut creates = Vec::new();
    let mut updates = Vec::new();
    let mut claimed = HashSet::new();
    for p in config {
        let id = p.id.as_deref();
        if id == Some(DEFAULT_PROJECT_ID) {
            claimed.insert(DEFAULT_PROJECT_ID);
            let current = by_id.get(DEFAULT_PROJECT_ID).map(|u| &u.tags);
            if current.is_some_and(|tags| *tags != p.tags) {
                out.warnings.push(format!(
                    "`{}` is the default project, whose tags cannot be changed: its tags in the config are not applied",
                    p.name
                ));
            }
            continue;
        }
        match id.and_then(|id| by_id.get(id)) {
            Some(u) => {
                claimed.insert(u.id.as_str());
                let (add, remove, was) = tag_diff(&u.tags, &p.tags);
                if !add.is_empty() || !remove.is_empty() {
                    updates.push(Action::UpdateTags {
                        id: u.id.clone(),
                        name: p.name.clone(),
                        add,
                        remove,
                        was,
                    });
                }
            }
            None => creates.push(Action::Create {
                name: p.name.clone(),
                tags: p.tags.clone(),
                stale_id: id.map(str::to_owned),
            }),
        }
    }
    let mut missing = Vec::new();
    for u in &active {
        if u.id == DEFAULT_PROJECT_ID || claimed.contains(u.id.as_str()) {
            continue;
        }
        let (id, name) = (u.id.clone(), u.display_name().to_owned());
        if let Some(Action::Create { name: n, .. }) = creates
            .iter()
            .find(|c| matches!(c, Action::Create { name: n, .. } if n == &name))
        {
            out.warnings.push(format!(
                "`{n}` has no matching id in the config, but an active project of that name exists ({id}): \
                 to adopt it instead of creating another, set `id = \"{id}\"` in its [[projects]] entry"
            ));
        }
        missing.push(if archive_missing {
            Action::Archive { id, name }
        } else {
            Action::Unmanaged { id, name }
        });
    }
    out.actions.extend(creates);
    out.actions.extend(updates);
    out.actions.extend(missing);
    out
}

/// `add_tags` (new and changed values), `remove_tag_keys`, and the old values of changed keys.
fn tag_diff(
    current: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
) -> (
    BTreeMap<String, String>,
    Vec<String>,
    BTreeMap<String, String>,
) {
    let mut add = BTreeMap::new();
    let mut was = BTreeMap::new();
    for (k, v) in desired {
        match current.get(k) {
            Some(old) if old == v => {}
            Some(old) => {
                was.insert(k.clone(), old.clone());
                add.insert(k.clone(), v.clone());
            }
            None => {
                add.insert(k.clone(), v.clone());
            }
        }
    }
    let remove = current
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .cloned()
        .collect();
    (add, remove, was)
}

/// The plan as a person reads it in a terminal: `+ create`, `~ update tags`, `- archive`,
/// `? unmanaged`, `! warning`, then one summary line (`no changes` when there is nothing to do).
#[must_use]
pub fn render(plan: &Plan) -> String {
    let mut s = String::new();
    for action in &plan.actions {
        match action {
            Action::Create {
                name,
                tags,
                stale_id,
            } => {
                let _ = writeln!(s, "  + create {}", quoted(name));
                if let Some(id) = stale_id {
                    let _ = writeln!(
                        s,
                        "      (id {id} is not an active project in the account: the new id replaces it)"
                    );
                }
                for (k, v) in tags {
                    let _ = writeln!(s, "      + {} = {}", quoted(k), quoted(v));
                }
            }
            Action::UpdateTags {
                id,
                name,
                add,
                remove,
                was,
            } => {
                let _ = writeln!(s, "  ~ update tags {} ({id})", quoted(name));
                for (k, v) in add {
                    match was.get(k) {
                        Some(old) => {
                            let _ = writeln!(
                                s,
                                "      ~ {} = {} -> {}",
                                quoted(k),
                                quoted(old),
                                quoted(v)
                            );
                        }
                        None => {
                            let _ = writeln!(s, "      + {} = {}", quoted(k), quoted(v));
                        }
                    }
                }
                for k in remove {
                    let _ = writeln!(s, "      - {}", quoted(k));
                }
            }
            Action::Archive { id, name } => {
                let _ = writeln!(s, "  - archive {} ({id}): not in the config", quoted(name));
            }
            Action::Unmanaged { id, name } => {
                let _ = writeln!(
                    s,
                    "  ? unmanaged {} ({id}): in the account, not in the config (left alone; --archive-missing archives it)",
                    quoted(name)
                );
            }
        }
    }
    for w in &plan.warnings {
        let _ = writeln!(s, "  ! {w}");
    }
    if plan.has_changes() {
        let count = |f: fn(&Action) -> bool| plan.actions.iter().filter(|a| f(a)).count();
        let _ = writeln!(
            s,
            "plan: {} to create, {} to update, {} to archive, {} unmanaged",
            count(|a| matches!(a, Action::Create { .. })),
            count(|a| matches!(a, Action::UpdateTags { .. })),
            count(|a| matches!(a, Action::Archive { .. })),
            count(|a| matches!(a, Action::Unmanaged { .. })),
        );
    } else {
        let unmanaged = plan.actions.len();
        if unmanaged == 0 {
            let _ = writeln!(s, "no changes: the account matches the config");
        } else {
            let _ = writeln!(
                s,
                "no changes: the account matches the config ({unmanaged} unmanaged)"
            );
        }
    }
    s
}

/// A name or value in double quotes, escaped as in TOML/JSON (and [`printable`]).
fn quoted(s: &str) -> String {
    printable(&serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\"")))
}

/// A failed Projects API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The API answered with an error status.
    #[error("bedrock-mantle answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: StatusCode,
        /// The `error.message` of an OpenAI-shaped body, or the start of any other body.
        message: String,
    },
    /// The call did not get an answer (connection, TLS, timeout).
    #[error("no answer from bedrock-mantle: {0}")]
    Transport(String),
    /// A success status with a body that is not what the API documents.
    #[error("unexpected answer from bedrock-mantle: {0}")]
    Body(String),
}

/// One page of `GET /v1/organization/projects`.
#[derive(Debug, Deserialize)]
struct Page {
    data: Vec<UpstreamProject>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

/// Client of the Projects API (`{base_url}/v1/organization/projects`), authenticated with the
/// admin key.
pub struct Api {
    client: reqwest::Client,
    /// `.../v1/organization/projects`.
    projects_url: Url,
    /// `Bearer <admin key>`.
    authorization: Secret<HeaderValue>,
    /// Time allowed for one call, answer read whole.
    call_timeout: Duration,
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api")
            .field("projects_url", &self.projects_url.as_str())
            .field("authorization", &self.authorization)
            .finish_non_exhaustive()
    }
}

impl Api {
    /// A client for the bedrock-mantle at `base_url` (scheme, host, optional path prefix; the
    /// Projects API is always under `/v1`, whatever the model prefixes).
    ///
    /// # Errors
    /// An unusable URL or key, or an HTTP client that cannot be built.
    pub fn new(base_url: &str, admin_key: &str) -> anyhow::Result<Self> {
        let projects_url = Url::parse(&format!(
            "{}/v1/organization/projects",
            base_url.trim_end_matches('/')
        ))
        .with_context(|| format!("`{base_url}` is not a URL"))?;
        let mut authorization =
            HeaderValue::from_str(&format!("Bearer {admin_key}")).map_err(|_| {
                anyhow::anyhow!("the admin API key contains characters HTTP cannot carry")
            })?;
        authorization.set_sensitive(true);
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Never carry the admin key anywhere the configured host did not ask for.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            client,
            projects_url,
            authorization: Secret::new(authorization),
            call_timeout: CALL_TIMEOUT,
        })
    }

    /// The same client with another time allowed per call ([`CALL_TIMEOUT`] by default).
    #[must_use]
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// A client for the config's upstream with the admin key from the environment variable
    /// named by `[upstream] admin_api_key_env`; `env` looks variables up (`std::env::var` in
    /// the CLI).
    ///
    /// # Errors
    /// The setting or the variable is missing: the inference key is not used as a fallback.
    pub fn from_config(
        config: &Config,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let Some(var) = config
            .upstream
            .admin_api_key_env
            .as_deref()
            .filter(|v| !v.is_empty())
        else {
            anyhow::bail!(
                "managing projects needs an admin key: set [upstream] admin_api_key_env to the name of an \
                 environment variable holding a Bedrock API key allowed to list, create, update and archive \
                 projects; the inference key ({}) is not used, as it normally may not manage projects",
                config.upstream.api_key_env
            );
        };
        let key = env(var).filter(|k| !k.is_empty()).ok_or_else(|| {
            anyhow::anyhow!(
                "the environment variable {var} (named by [upstream] admin_api_key_env) is not set: \
                 it must hold a Bedrock API key allowed to manage projects"
            )
        })?;
        Self::new(&config.upstream.base_url, &key)
    }

    /// Every project in the account, following `has_more`/`after` through all pages.
    ///
    /// # Errors
    /// Any failed call, or a cursor that does not advance.
    pub async fn list(&self) -> Result<Vec<UpstreamProject>, ApiError> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut url = self.projects_url.clone();
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("limit", &PAGE_LIMIT.to_string());
                if let Some(a) = &after {
                    q.append_pair("after", a);
                }
            }
            let page: Page = self.call(Method::GET, url, None).await?;
            // The cursor is the last id of the page; `last_id` only when the page is empty
            // (an AWS sample shows a `last_id` that is not in `data`).
            let next = page
                .data
                .last()
                .map(|p| p.id.clone())
                .or(page.last_id.clone());
            for p in page.data {
                // The account's own `default` project is listed; any other id must be one
                // mantlegate could write into the config.
                if p.id != DEFAULT_PROJECT_ID && !is_managed_id(&p.id) {
                    return Err(ApiError::Body(format!(
                        "the project list holds the id {:?}, which is not a Bedrock project ID (proj_ followed by letters and digits)",
                        p.id
                    )));
                }
                if !seen.insert(p.id.clone()) {
                    return Err(ApiError::Body(format!(
                        "the project list holds the id {:?} twice",
                        p.id
                    )));
                }
                out.push(p);
            }
            if !page.has_more {
                return Ok(out);
            }
            match next {
                Some(n) if after.as_deref() != Some(n.as_str()) => after = Some(n),
                _ => {
                    return Err(ApiError::Body(
                        "the project list says has_more but its cursor does not advance".to_owned(),
                    ));
                }
            }
        }
        Err(ApiError::Body(format!(
            "the project list did not end after {MAX_PAGES} pages"
        )))
    }

    /// `POST /v1/organization/projects` with `{name, tags}`.
    ///
    /// # Errors
    /// The call failed or its answer is not a project.
    pub async fn create(
        &self,
        name: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<UpstreamProject, ApiError> {
        let body = json!({ "name": name, "tags": tags });
        self.call(Method::POST, self.projects_url.clone(), Some(body))
            .await
    }

    /// `POST /v1/organization/projects/{id}` with `add_tags` and `remove_tag_keys`.
    ///
    /// # Errors
    /// The call failed or its answer is not a project.
    pub async fn update_tags(
        &self,
        id: &str,
        add: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<UpstreamProject, ApiError> {
        let mut body = serde_json::Map::new();
        if !add.is_empty() {
            body.insert("add_tags".to_owned(), json!(add));
        }
        if !remove.is_empty() {
            body.insert("remove_tag_keys".to_owned(), json!(remove));
        }
        self.call(
            Method::POST,
            self.project_url(id, false),
            Some(Value::Object(body)),
        )
        .await
    }

    /// `POST /v1/organization/projects/{id}/archive`.
    ///
    /// # Errors
    /// The call failed or its answer is not a project.
    pub async fn archive(&self, id: &str) -> Result<UpstreamProject, ApiError> {
        self.call(Method::POST, self.project_url(id, true), None)
            .await
    }

    fn project_url(&self, id: &str, archive: bool) -> Url {
        let mut url = self.projects_url.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.push(id);
            if archive {
                segments.push("archive");
            }
        }
        url
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<Value>,
    ) -> Result<T, ApiError> {
        let mut req = self.client.request(method, url).header(
            reqwest::header::AUTHORIZATION,
            self.authorization.expose().clone(),
        );
        if let Some(body) = body {
            req = req.json(&body);
        }
        let (status, bytes) = tokio::time::timeout(self.call_timeout, async {
            let mut resp = req
                .send()
                .await
                .map_err(|e| ApiError::Transport(error_chain(&e)))?;
            let too_large = || {
                ApiError::Body(format!(
                    "the answer is larger than {MAX_ANSWER_BYTES} bytes: refused"
                ))
            };
            if resp
                .content_length()
                .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
            {
                return Err(too_large());
            }
            let mut bytes = Vec::new();
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| ApiError::Transport(error_chain(&e)))?
            {
                if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Err(too_large());
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok((resp.status(), bytes))
        })
        .await
        .map_err(|_| {
            ApiError::Transport(format!(
                "no whole answer within {} s: refused",
                self.call_timeout.as_secs_f64()
            ))
        })??;
        if !status.is_success() {
            return Err(ApiError::Status {
                status,
                message: error_message(&bytes),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::Body(format!(
                "{} in `{}`",
                printable(&e.to_string()),
                excerpt(&bytes)
            ))
        })
    }
}

/// An error and its causes on one line (reqwest's own message omits the cause), printable.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let _ = write!(s, ": {cause}");
        source = cause.source();
    }
    printable(&s)
}

/// The message of an error body: OpenAI's `error.message` (with `error.code`), AWS's
/// `message`/`Message`, or the start of whatever else it is.
fn error_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if let Some(msg) = v.pointer("/error/message").and_then(Value::as_str) {
            return match v.pointer("/error/code").and_then(Value::as_str) {
                Some(code) => format!("{} ({})", printable(msg), printable(code)),
                None => printable(msg),
            };
        }
        if let Some(msg) = ["message", "Message"]
            .iter()
            .find_map(|k| v.get(k).and_then(Value::as_str))
        {
            return printable(msg);
        }
    }
    excerpt(body)
}

/// The start of a body, for messages.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".to_owned();
    }
    match text.char_indices().nth(300) {
        Some((cut, _)) => format!("{}...", printable(&text[..cut])),
        None => printable(text),
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// `(config name, new id)` of each project created.
    pub created: Vec<(String, String)>,
    /// `(config name, id)` of each project whose tags changed.
    pub updated: Vec<(String, String)>,
    /// `(name, id)` of each project archived.
    pub archived: Vec<(String, String)>,
}

impl Applied {
    /// Whether anything was done.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.updated.is_empty() && self.archived.is_empty()
    }
}

impl fmt::Display for Applied {
    /// `created A (proj_1); updated tags of B (proj_2)`, or `nothing`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("nothing");
        }
        let parts: Vec<String> = self
            .created
            .iter()
            .map(|(n, id)| format!("created `{}` ({id})", printable(n)))
            .chain(
                self.updated
                    .iter()
                    .map(|(n, id)| format!("updated the tags of `{}` ({id})", printable(n))),
            )
            .chain(
                self.archived
                    .iter()
                    .map(|(n, id)| format!("archived `{}` ({id})", printable(n))),
            )
            .collect();
        f.write_str(&parts.join("; "))
    }
}

/// A step of [`apply`] failed; the steps before it were done.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action}: {source}\nalready done: {done}")]
pub struct ApplyError {
    /// The step that failed.
    pub action: String,
    /// Why.
    #[source]
    pub source: ApiError,
    /// What was done before it.
    pub done: Applied,
}

/// Runs the plan's changes in order (creates, tag updates, archives) and stops at the first
/// failure. `progress` gets one line per step done.
///
/// # Errors
/// The failed step, with everything done before it.
pub async fn apply(
    api: &Api,
    plan: &Plan,
    progress: &mut dyn Write,
) -> Result<Applied, Box<ApplyError>> {
    let mut done = Applied::default();
    let mut taken = plan.taken_ids.clone();
    for action in &plan.actions {
        let result = match action {
            Action::Create { name, tags, .. } => {
                api.create(name, tags).await.and_then(|p| {
                    // The id goes into the config file: only a fresh project id is taken.
                    if !is_managed_id(&p.id) {
                        return Err(ApiError::Body(format!(
                            "the new project's id {:?} is not a Bedrock project ID (proj_ followed by letters and digits): \
                             it was not written to the config; check the account's projects before applying again",
                            p.id
                        )));
                    }
                    if !taken.insert(p.id.clone()) {
                        return Err(ApiError::Body(format!(
                            "the new project's id {:?} is already in use (in the account or the config): \
                             it was not written to the config; check the account's projects before applying again",
                            p.id
                        )));
                    }
                    let _ = writeln!(progress, "created `{}`: {}", printable(name), p.id);
                    done.created.push((name.clone(), p.id));
                    Ok(())
                })
            }
            Action::UpdateTags {
                id,
                name,
                add,
                remove,
                ..
            } => api.update_tags(id, add, remove).await.map(|_| {
                let _ = writeln!(progress, "updated the tags of `{}` ({id})", printable(name));
                done.updated.push((name.clone(), id.clone()));
            }),
            Action::Archive { id, name } => api.archive(id).await.map(|_| {
                let _ = writeln!(progress, "archived `{}` ({id})", printable(name));
                done.archived.push((name.clone(), id.clone()));
            }),
            Action::Unmanaged { .. } => Ok(()),
        };
        if let Err(source) = result {
            return Err(Box::new(ApplyError {
                action: action.to_string(),
                source,
                done,
            }));
        }
    }
    Ok(done)
}

/// Sets `id = "<id>"` in the `[[projects]]` entry named `name`, for each pair, editing the file
/// in place with `toml_edit`: comments, order and spacing stay as they were. A new `id` goes on
/// the line after the entry's `name`; an existing one gets its value replaced.
///
/// # Errors
/// The file cannot be read, parsed or written, or a name is not in it (nothing is written then).
pub fn write_ids(path: &Path, ids: &[(String, String)]) -> anyhow::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let bytes = crate::config::read_file(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("cannot read {}: not UTF-8 text", path.display()))?;
    let updated = set_ids(&text, ids).with_context(|| format!("cannot edit {}", path.display()))?;
    write_in_place(path, &updated).with_context(|| format!("cannot write {}", path.display()))
}

/// [`write_ids`] on text.
///
/// # Errors
/// The text does not parse, or a name has no `[[projects]]` entry.
pub fn set_ids(text: &str, ids: &[(String, String)]) -> anyhow::Result<String> {
    let mut doc: toml_edit::DocumentMut = text.parse().context("not valid TOML")?;
    let mut missing: Vec<&str> = Vec::new();
    for (name, id) in ids {
        let found = match doc.get_mut("projects") {
            Some(toml_edit::Item::ArrayOfTables(entries)) => entries
                .iter_mut()
                .find(|t| t.get("name").and_then(toml_edit::Item::as_str) == Some(name.as_str()))
                .map(|t| set_table_id(t, id))
                .is_some(),
            Some(toml_edit::Item::Value(toml_edit::Value::Array(entries))) => entries
                .iter_mut()
                .filter_map(toml_edit::Value::as_inline_table_mut)
                .find(|t| t.get("name").and_then(toml_edit::Value::as_str) == Some(name.as_str()))
                .map(|t| set_inline_id(t, id))
                .is_some(),
            _ => false,
        };
        if !found {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        anyhow::bail!(
            "no [[projects]] entry named {} (was the file changed meanwhile?)",
            missing
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(doc.to_string())
}

fn set_table_id(table: &mut toml_edit::Table, id: &str) {
    if let Some(toml_edit::Item::Value(v)) = table.get_mut("id") {
        replace_keeping_decor(v, id);
        return;
    }
    // Entries after `name` come out and go back in behind the new `id`, each with its own
    // formatting (key decor holds the comments above a line).
    let keys: Vec<String> = table.iter().map(|(k, _)| k.to_owned()).collect();
    let after: Vec<&String> = keys
        .iter()
        .skip_while(|k| k.as_str() != "name")
        .skip(1)
        .collect();
    let moved: Vec<(toml_edit::Key, toml_edit::Item)> =
        after.iter().filter_map(|k| table.remove_entry(k)).collect();
    let indent = table
        .key("name")
        .and_then(|k| k.leaf_decor().prefix())
        .and_then(toml_edit::RawString::as_str)
        .map(|p| p.rsplit('\n').next().unwrap_or("").to_owned())
        .unwrap_or_default();
    let mut key = toml_edit::Key::new("id");
    key.leaf_decor_mut().set_prefix(indent);
    key.leaf_decor_mut().set_suffix(" ");
    table.insert_formatted(&key, toml_edit::value(id));
    for (k, item) in moved {
        table.insert_formatted(&k, item);
    }
}

fn set_inline_id(table: &mut toml_edit::InlineTable, id: &str) {
    if let Some(v) = table.get_mut("id") {
        replace_keeping_decor(v, id);
        return;
    }
    let keys: Vec<String> = table.iter().map(|(k, _)| k.to_owned()).collect();
    let after: Vec<&String> = keys
        .iter()
        .skip_while(|k| k.as_str() != "name")
        .skip(1)
        .collect();
    let moved: Vec<(toml_edit::Key, toml_edit::Value)> =
        after.iter().filter_map(|k| table.remove_entry(k)).collect();
    let mut key = toml_edit::Key::new("id");
    key.leaf_decor_mut().set_prefix(" ");
    key.leaf_decor_mut().set_suffix(" ");
    table.insert_formatted(&key, toml_edit::Value::from(id));
    for (k, v) in moved {
        table.insert_formatted(&k, v);
    }
}

fn replace_keeping_decor(v: &mut toml_edit::Value, id: &str) {
    let decor = v.decor().clone();
    *v = toml_edit::Value::from(id);
    *v.decor_mut() = decor;
}

/// Replaces the file's content through a temporary file in the same directory and a rename, so
/// a crash leaves the old file or the new one, never half of one. Symlinks are followed and
/// the file's permissions kept.
pub(crate) fn write_in_place(path: &Path, text: &str) -> std::io::Result<()> {
    let target = std::fs::canonicalize(path)?;
    let dir = target.parent().unwrap_or_else(|| Path::new("."));
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.mantlegate-{}", std::process::id()));
    let permissions = std::fs::metadata(&target)?.permissions();
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::set_permissions(&tmp, permissions)?;
        std::fs::rename(&tmp, &target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Loads a config for planning: every problem stops it, except projects without an `id`
/// (which are the ones to create).
///
/// # Errors
/// The config cannot be read or parsed, or has problems (all listed).
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    Config::load_for_projects(path).map_err(|e| match e {
        ConfigError::Invalid(problems) => anyhow::anyhow!(
            "{}: {} problem(s), nothing was planned:\n{}",
            path.display(),
            problems.len(),
            problems
                .iter()
                .map(|p| format!("  - {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        ),
        other => anyhow::anyhow!("{other}"),
    })
}

/// Lists the account's projects and plans against the config at `path`, printing the plan.
///
/// # Errors
/// An invalid config, a failed listing, or a plan past the project quota (printed first).
pub async fn plan_with(
    api: &Api,
    path: &Path,
    archive_missing: bool,
    out: &mut dyn Write,
) -> anyhow::Result<Plan> {
    let config = load_config(path)?;
    let upstream = api
        .list()
        .await
        .context("cannot list the account's projects")?;
    let plan = plan(&config.projects, &upstream, archive_missing);
    out.write_all(render(&plan).as_bytes())?;
    plan.check_quota()?;
    Ok(plan)
}

/// Plans, applies, and writes the ids of created projects into the config file (also when a
/// later step fails). Prints the plan, each step, and `no changes` when there is nothing to do.
///
/// # Errors
/// Anything [`plan_with`] refuses, a failed step (with what was already done), or a file that
/// cannot be rewritten (with the ids to add by hand).
pub async fn apply_with(
    api: &Api,
    path: &Path,
    archive_missing: bool,
    out: &mut dyn Write,
) -> anyhow::Result<Applied> {
    let plan = plan_with(api, path, archive_missing, out).await?;
    if !plan.has_changes() {
        return Ok(Applied::default());
    }
    let (done, failure) = match apply(api, &plan, out).await {
        Ok(done) => (done, None),
        Err(e) => (e.done.clone(), Some(e)),
    };
    // Ids are written also after a failure: a created project whose id is lost would be
    // created again by the next apply.
    let note = match write_ids(path, &done.created) {
        Ok(()) if done.created.is_empty() => None,
        Ok(()) => {
            writeln!(
                out,
                "wrote {} new id(s) to {}",
                done.created.len(),
                path.display()
            )?;
            None
        }
        Err(e) => Some(format!(
            "the ids of the projects created could not be written to {} ({e:#}); add them by hand:\n{}",
            path.display(),
            done.created
                .iter()
                .map(|(n, id)| format!("  [[projects]] name = \"{n}\": id = \"{id}\""))
                .collect::<Vec<_>>()
                .join("\n")
        )),
    };
    if let Some(e) = failure {
        let mut msg = format!("apply stopped: {e}");
        if let Some(note) = note {
            let _ = write!(msg, "\n{note}");
        }
        anyhow::bail!(msg);
    }
    if let Some(note) = note {
        anyhow::bail!(note);
    }
    writeln!(
        out,
        "apply complete: {} created, {} updated, {} archived",
        done.created.len(),
        done.updated.len(),
        done.archived.len()
    )?;
    Ok(done)
}

/// `mantlegate projects plan`: the admin key comes from the environment.
///
/// # Errors
/// See [`plan_with`]; also a missing admin key.
pub async fn plan_command(path: &Path, archive_missing: bool) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let api = Api::from_config(&config, |v| std::env::var(v).ok())?;
    plan_with(&api, path, archive_missing, &mut std::io::stdout()).await?;
    Ok(())
}

/// `mantlegate projects apply`: the admin key comes from the environment.
///
/// # Errors
/// See [`apply_with`]; also a missing admin key.
pub async fn apply_command(path: &Path, archive_missing: bool) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let api = Api::from_config(&config, |v| std::env::var(v).ok())?;
    apply_with(&api, path, archive_missing, &mut std::io::stdout()).await?;
    Ok(())
}

/// A project's month-to-date spend from the ledger's roll-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MonthSpend {
    /// Cost of the priced calls, USD.
    pub cost_usd: Decimal,
    /// Calls whose model had no price: their cost is unknown and not in `cost_usd`.
    pub unpriced_requests: i64,
}

/// The body of `GET /admin/v1/projects`: each project of the running config with its name, id,
/// tags, the names of the keys that may use it, the route prefixes that bill it, whether it is
/// the fallback for calls that name none, its month-to-date spend in USD (a decimal string;
/// `spend` is keyed by project id, a missing entry is zero) and its unpriced calls this month
/// apart. A project whose calls this month are unpriced and whose priced calls cost nothing
/// has a `null` spend: unknown, never a silent $0.
#[must_use]
pub fn overview<S: std::hash::BuildHasher>(
    snapshot: &Snapshot,
    spend: &HashMap<String, MonthSpend, S>,
) -> Value {
    let data: Vec<Value> = snapshot
        .projects
        .iter()
        .enumerate()
        .map(|(idx, p)| {
            // A rotated key has two entries with one name: list it once.
            let keys: BTreeSet<&str> = snapshot
                .keys_iter()
                .filter(|k| k.projects.contains(&idx))
                .map(|k| &*k.name)
                .collect();
            let routes: BTreeSet<&str> = snapshot
                .routes
                .iter()
                .filter(|r| r.project == idx)
                .map(|r| &*r.prefix)
                .collect();
            let mtd = spend.get(&*p.id).copied().unwrap_or_default();
            let known = !mtd.cost_usd.is_zero() || mtd.unpriced_requests == 0;
            json!({
                "object": "mantlegate.project",
                "name": &*p.name,
                "id": &*p.id,
                "tags": p.tags,
                "keys": keys,
                "routes": routes,
                "fallback": snapshot.fallback_project == Some(idx),
                "month_to_date_usd": known.then(|| mtd.cost_usd.normalize().to_string()),
                "month_to_date_unpriced_requests": mtd.unpriced_requests,
            })
        })
        .collect();
    json!({ "object": "list", "data": data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, id: Option<&str>, tags: &[(&str, &str)]) -> ProjectConfig {
        ProjectConfig {
            name: name.to_owned(),
            id: id.map(str::to_owned),
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn up(id: &str, name: &str, tags: &[(&str, &str)]) -> UpstreamProject {
        UpstreamProject {
            id: id.to_owned(),
            name: Some(name.to_owned()),
            status: Some("active".to_owned()),
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            archived_at: None,
        }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn matching_config_and_account_is_no_change() {
        let p = plan(
            &[cfg("A", Some("proj_a"), &[("Team", "x")])],
            &[
                up("default", "Default", &[]),
                up("proj_a", "A", &[("Team", "x")]),
            ],
            true,
        );
        assert!(!p.has_changes(), "{p:?}");
        assert!(
            p.actions.is_empty(),
            "the default project is never reported"
        );
        assert_eq!(p.active_upstream, 2);
        assert!(render(&p).ends_with("no changes: the account matches the config\n"));
    }

    #[test]
    fn missing_or_unknown_id_is_a_create() {
        let p = plan(
            &[
                cfg("New", None, &[("Team", "x")]),
                cfg("Gone", Some("proj_gone"), &[]),
            ],
            &[],
            false,
        );
        assert_eq!(
            p.actions,
            vec![
                Action::Create {
                    name: "New".into(),
                    tags: map(&[("Team", "x")]),
                    stale_id: None
                },
                Action::Create {
                    name: "Gone".into(),
                    tags: map(&[]),
                    stale_id: Some("proj_gone".into())
                },
            ]
        );
        assert_eq!(p.creates(), 2);
    }

    #[test]
    fn archived_upstream_projects_do_not_exist() {
        let mut archived = up("proj_a", "A", &[]);
        archived.status = Some("archived".into());
        archived.archived_at = Some(1_786_614_394);
        let p = plan(&[cfg("A", Some("proj_a"), &[])], &[archived], true);
        assert!(matches!(
            &p.actions[..],
            [Action::Create { stale_id: Some(id), .. }] if id == "proj_a"
        ));
        assert_eq!(p.active_upstream, 0);
    }

    #[test]
    fn tags_added_changed_and_removed() {
        let p = plan(
            &[cfg(
                "A",
                Some("proj_a"),
                &[("Keep", "1"), ("Change", "new"), ("Add", "2")],
            )],
            &[up(
                "proj_a",
                "A",
                &[("Keep", "1"), ("Change", "old"), ("Drop", "3")],
            )],
            false,
        );
        assert_eq!(
            p.actions,
            vec![Action::UpdateTags {
                id: "proj_a".into(),
                name: "A".into(),
                add: map(&[("Add", "2"), ("Change", "new")]),
                remove: vec!["Drop".into()],
                was: map(&[("Change", "old")]),
            }]
        );
        let text = render(&p);
        assert!(text.contains("~ update tags \"A\" (proj_a)"), "{text}");
        assert!(text.contains("+ \"Add\" = \"2\""), "{text}");
        assert!(text.contains("~ \"Change\" = \"old\" -> \"new\""), "{text}");
        assert!(text.contains("- \"Drop\""), "{text}");
    }

    #[test]
    fn projects_not_in_the_config_are_unmanaged_unless_archiving() {
        let upstream = [up("default", "Default", &[]), up("proj_x", "X", &[])];
        let keep = plan(&[], &upstream, false);
        assert_eq!(
            keep.actions,
            vec![Action::Unmanaged {
                id: "proj_x".into(),
                name: "X".into()
            }]
        );
        assert!(!keep.has_changes());
        assert!(render(&keep).contains("? unmanaged \"X\" (proj_x)"));
        let archive = plan(&[], &upstream, true);
        assert_eq!(
            archive.actions,
            vec![Action::Archive {
                id: "proj_x".into(),
                name: "X".into()
            }]
        );
        assert!(render(&archive).contains("- archive \"X\" (proj_x)"));
    }

    #[test]
    fn the_default_project_is_never_touched() {
        let p = plan(
            &[cfg("Default", Some("default"), &[("Team", "x")])],
            &[],
            true,
        );
        assert!(p.actions.is_empty(), "{p:?}");
        let p = plan(
            &[cfg("Default", Some("default"), &[("Team", "x")])],
            &[up("default", "Default", &[])],
            true,
        );
        assert!(p.actions.is_empty(), "{p:?}");
        assert_eq!(p.warnings.len(), 1, "{p:?}");
    }

    #[test]
    fn same_name_upstream_is_flagged_as_a_likely_duplicate() {
        let p = plan(&[cfg("A", None, &[])], &[up("proj_a", "A", &[])], false);
        assert_eq!(p.creates(), 1);
        assert!(p.warnings[0].contains("id = \"proj_a\""), "{p:?}");
        assert!(render(&p).contains("! `A` has no matching id"));
    }

    #[test]
    fn quota_counts_active_projects_and_creates() {
        let upstream: Vec<UpstreamProject> = (0..999)
            .map(|i| up(&format!("proj_{i}"), "x", &[]))
            .collect();
        let config: Vec<ProjectConfig> = upstream
            .iter()
            .map(|u| cfg(&u.id, Some(&u.id), &[]))
            .collect();
        let mut one = config.clone();
        one.push(cfg("new1", None, &[]));
        assert!(plan(&one, &upstream, false).check_quota().is_ok());
        one.push(cfg("new2", None, &[]));
        let err = plan(&one, &upstream, false)
            .check_quota()
            .expect_err("over the quota");
        assert!(
            err.to_string()
                .contains("999 active project(s) and the plan creates 2")
        );
    }

    #[test]
    fn project_objects_parse_with_missing_or_null_fields() {
        let p: UpstreamProject = serde_json::from_str(
            r#"{"id":"proj_a","object":"organization.project","name":"A","arn":"arn:x","created_at":1,
                "status":"archived","archived_at":2,"tags":null,"data_retention":{"mode":"inherit"}}"#,
        )
        .expect("parses");
        assert!(p.tags.is_empty());
        assert!(!p.is_active());
        let p: UpstreamProject = serde_json::from_str(r#"{"id":"default"}"#).expect("parses");
        assert!(p.is_active());
    }

    #[test]
    fn error_messages_from_any_body() {
        assert_eq!(
            error_message(br#"{"error":{"message":"nope","type":"x","code":"bad"}}"#),
            "nope (bad)"
        );
        assert_eq!(
            error_message(br#"{"message":"AccessDenied"}"#),
            "AccessDenied"
        );
        assert_eq!(
            error_message(b"<html>gateway</html>"),
            "<html>gateway</html>"
        );
        assert_eq!(error_message(b""), "(empty body)");
        assert!(error_message("x".repeat(1000).as_bytes()).ends_with("..."));
    }

    #[test]
    fn ids_go_after_the_name_and_keep_everything_else() {
        let text = "# projects\n[[projects]]\n# the bot\nname = \"A\" # trailing\n# its tags\ntags = { Team = \"x\" }\n\n[[projects]]\n  name = \"B\"\n  id = \"proj_old\" # stale\n[projects.tags]\nTeam = \"y\"\n";
        let out = set_ids(
            text,
            &[
                ("A".into(), "proj_new".into()),
                ("B".into(), "proj_b".into()),
            ],
        )
        .expect("edited");
        assert_eq!(
            out,
            "# projects\n[[projects]]\n# the bot\nname = \"A\" # trailing\nid = \"proj_new\"\n# its tags\ntags = { Team = \"x\" }\n\n[[projects]]\n  name = \"B\"\n  id = \"proj_b\" # stale\n[projects.tags]\nTeam = \"y\"\n"
        );
    }

    #[test]
    fn ids_in_inline_project_arrays() {
        let text = "projects = [ { name = \"A\", tags = { T = \"1\" } } ]\n";
        let out = set_ids(text, &[("A".into(), "proj_a".into())]).expect("edited");
        assert_eq!(
            out,
            "projects = [ { name = \"A\", id = \"proj_a\", tags = { T = \"1\" } } ]\n"
        );
    }

    #[test]
    fn unknown_names_are_refused() {
        let err = set_ids(
            "[[projects]]\nname = \"A\"\n",
            &[("Z".into(), "proj_z".into())],
        )
        .expect_err("no such entry");
        assert!(err.to_string().contains("`Z`"), "{err}");
    }
}
