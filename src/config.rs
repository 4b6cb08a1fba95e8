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
    /// Directory of the config file, for relative paths in it (not a TOML field).
    #[serde(skip)]
    pub source_dir: Option<std::path::PathBuf>,
}

/// `[ledger]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// SQLite file of the embedded ledger (relative to the working directory).
    pub path: String,
    /// Records that may wait for the writer; past it new records are dropped and counted.
    pub queue_capacity: usize,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            path: "mantlegate.db".to_owned(),
            queue_capacity: 100_000,
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
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on (`--listen` overrides it). Port 0 picks a free port.
    pub listen: String,
    /// Largest request body accepted; larger ones get 413 `request_too_large`.
    pub max_body_bytes: usize,
    /// On SIGTERM/SIGINT, how long calls in flight may take to finish before exit.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_owned(),
            max_body_bytes: 10 * 1024 * 1024,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// `[upstream]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Scheme and host of bedrock-mantle, with an optional path prefix.
    pub base_url: String,
    /// Environment variable holding the Bedrock API key sent upstream.
    #[serde(default = "default_api_key_env")]
    pub api_key_env: String,
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
fn default_response_timeout() -> Duration {
    Duration::from_mins(5)
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
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
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

impl Config {
    /// Reads, parses and validates a configuration file.
    ///
    /// # Errors
    /// Returns every problem found; see [`ConfigError`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_in(&text, path.parent()).map_err(|e| match e {
            ConfigError::Parse(msg) => ConfigError::Parse(format!("{}: {msg}", path.display())),
            other => other,
        })
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
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
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
        v.problems
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
                    .map(|(path, message)| Problem { path, message })
                    .collect()
            },
        )
    }

    fn validate_rest(&self, v: &mut Validator) {
        if self.ledger.path.trim().is_empty() {
            v.add("ledger.path", "must name a file");
        }
        if self.ledger.queue_capacity == 0 {
            v.add("ledger.queue_capacity", "must be greater than 0");
        }
        if self.admin.token_env.as_deref().is_some_and(str::is_empty) {
            v.add("admin.token_env", "must name an environment variable");
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
        if self.server.max_body_bytes == 0 {
            v.add("server.max_body_bytes", "must be greater than 0");
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
                    if !is_project_id(id) {
                        v.add(
                            format!("{path}.id"),
                            format!(
                                "`{id}` is not a Bedrock project ID: expected proj_ followed by letters and digits, or `default`"
                            ),
                        );
                    }
                    if let Some(first) = ids.insert(id.as_str(), i) {
                        v.add(
                            format!("{path}.id"),
                            format!("id `{id}` is already used by projects[{first}]"),
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
        });
    }
}

fn check_ref(v: &mut Validator, path: &str, name: &str, names: &HashSet<&str>) {
    if !names.contains(name) {
        v.add(
            path,
            format!("project `{name}` is not declared in [[projects]]"),
        );
    }
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
const RESERVED_FIRST_SEGMENTS: [&str; 5] = ["v1", "admin", "healthz", "readyz", "metrics"];

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

/// Whether `id` has the shape of a Bedrock project ID: `proj_[A-Za-z0-9]+` or `default`.
#[must_use]
pub fn is_project_id(id: &str) -> bool {
    id == "default"
        || id
            .strip_prefix("proj_")
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
    fn project_ids() {
        assert!(is_project_id("proj_5d5ykleja6cwpirysbb7"));
        assert!(is_project_id("default"));
        assert!(!is_project_id("proj_"));
        assert!(!is_project_id("proj-1"));
        assert!(!is_project_id("proj_a b"));
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
}
