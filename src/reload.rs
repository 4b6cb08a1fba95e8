//! Live reload: SIGHUP or a change of the config file (or of the upstream key file) loads,
//! validates and swaps in a new config snapshot; an invalid one is refused and the old stays.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::Config;
use crate::state::{AppState, Snapshot};

/// Reloads one config file into one app state.
pub struct Reloader {
    path: PathBuf,
    state: AppState,
    fingerprint: AtomicU64,
}

/// The Bedrock API key a config names: the file's content, else the environment variable.
///
/// # Errors
/// When `api_key_file` is set but cannot be read.
pub fn upstream_key(config: &Config) -> anyhow::Result<Option<String>> {
    if let Some(file) = &config.upstream.api_key_file {
        let path = resolve(config, file);
        let text = crate::config::read_file(&path)
            .and_then(|bytes| {
                String::from_utf8(bytes).map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text")
                })
            })
            .map_err(|e| {
                anyhow::anyhow!("cannot read upstream.api_key_file {}: {e}", path.display())
            })?;
        let key = text.trim().to_owned();
        return Ok((!key.is_empty()).then_some(key));
    }
    Ok(std::env::var(&config.upstream.api_key_env)
        .ok()
        .filter(|k| !k.is_empty()))
}

fn resolve(config: &Config, file: &str) -> PathBuf {
    let p = Path::new(file);
    match &config.source_dir {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// A hash of everything a reload reads: the config file and the key file it names, each read
/// by [`read_file`](crate::config::read_file) (never blocking, never more than its limit). A
/// file that cannot be read hashes as its error, so that a path turning into something else
/// (a FIFO, a device) is a change, whose reload is refused with the reason.
fn fingerprint(path: &Path) -> u64 {
    fn read(path: &Path, h: &mut DefaultHasher) -> Option<Vec<u8>> {
        match crate::config::read_file(path) {
            Ok(bytes) => {
                bytes.hash(h);
                Some(bytes)
            }
            Err(e) => {
                e.to_string().hash(h);
                None
            }
        }
    }
    let mut h = DefaultHasher::new();
    if let Some(text) = read(path, &mut h)
        && let Ok(config) = Config::from_toml_in(&String::from_utf8_lossy(&text), path.parent())
        && let Some(file) = &config.upstream.api_key_file
    {
        read(&resolve(&config, file), &mut h);
    }
    h.finish()
}

impl Reloader {
    /// A reloader of `path` into `state` (whose snapshot was built from that file).
    #[must_use]
    pub fn new(path: &Path, state: AppState) -> Self {
        Self {
            fingerprint: AtomicU64::new(fingerprint(path)),
            path: path.to_path_buf(),
            state,
        }
    }

    /// Loads, validates and swaps in the config. Calls that have not been forwarded yet are
    /// authenticated, attributed and admitted under the new config; calls in flight finish
    /// under the one they were admitted under. A budget that continues (same name, scope and
    /// time zone) keeps its live state object, so what calls in flight reserved and spend
    /// lands in it; a budget the reload brings starts from the ledger's spend of its month.
    /// Rate-limit state carries over for rules that still exist.
    /// Returns whether the new config was taken.
    pub fn reload(&self, reason: &str) -> bool {
        self.fingerprint
            .store(fingerprint(&self.path), Ordering::Relaxed);
        let built = Config::load(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|config| {
                let key = upstream_key(&config).map_err(|e| format!("{e:#}"))?;
                let next =
                    Snapshot::build(&config, key.as_deref()).map_err(|e| format!("{e:#}"))?;
                Ok((next, config.limits.store))
            });
        match built {
            Ok((mut next, store_url)) => {
                let old = self.state.snapshot.load();
                let fresh = next.budgets.carry_over(&old.budgets);
                if fresh.contains(&true) {
                    self.seed_new_budgets(&next.budgets, &fresh);
                }
                if next.rate_limit_config == old.rate_limit_config {
                    next.limiter = old.limiter.clone();
                    next.rate_store.clone_from(&old.rate_store);
                } else if let Some(store) = &old.rate_store {
                    // New rules, same shared store: rules that did not change find their
                    // counters there (keys name the rule, not its position).
                    next.share_rate_limits(store);
                }
                let running = old.rate_store.as_ref().map(|s| s.url().to_owned());
                let wanted = store_url.map(|u| crate::config::describe_store_url(&u).unwrap_or(u));
                if running != wanted {
                    tracing::warn!(
                        running = running.as_deref().unwrap_or("per replica"),
                        configured = wanted.as_deref().unwrap_or("per replica"),
                        "limits.store changed: it takes effect at the next restart"
                    );
                }
                let (projects, keys, routes) =
                    (next.projects.len(), next.key_count, next.routes.len());
                // Swapped in before it is announced: a call forwarded after the line is read
                // runs under it.
                self.state.snapshot.store(Arc::new(next));
                tracing::info!(reason, projects, keys, routes, "config reloaded");
                self.state.metrics.reloaded(true);
                true
            }
            Err(problems) => {
                for line in problems.lines() {
                    tracing::error!(reason, problem = %line.trim(), "config reload refused; keeping the running config");
                }
                self.state.metrics.reloaded(false);
                false
            }
        }
    }

    /// Seeds the budgets a reload brings (new, renamed, re-scoped, or back after being
    /// absent) from the ledger's spend of their month, as a start does: never from 0. A
    /// ledger that cannot be read leaves them at 0 for now (the fleet refresh corrects a
    /// shared ledger's figure), and says so.
    fn seed_new_budgets(&self, budgets: &crate::budget::Budgets, fresh: &[bool]) {
        let seeded = match (&self.state.fleet, &self.state.reader) {
            (Some(pg), _) => budgets.seed_from_fleet(Some(fresh), pg),
            (None, Some(reader)) => budgets.seed_from_ledger_only(fresh, &**reader),
            (None, None) => Ok(()),
        };
        if let Err(err) = seeded {
            tracing::warn!(error = %format!("{err:#}"), "cannot read the ledger's spend for budgets the reload added: they count from 0 until it answers");
        }
    }

    /// Reloads on SIGHUP, and when the file (or its key file) changes, checked every
    /// `interval`. Polling the content is simpler and sturdier than file-system events: it
    /// sees editors' rename-and-replace and Kubernetes' `ConfigMap` symlink swaps alike.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            tokio::select! {
                () = hangup => {
                    // Off the async workers: seeding budgets a reload adds reads the ledger.
                    let this = self.clone();
                    let _ = tokio::task::spawn_blocking(move || this.reload("SIGHUP")).await;
                }
                () = tokio::time::sleep(interval) => {
                    let this = self.clone();
                    let changed = tokio::task::spawn_blocking(move || {
                        fingerprint(&this.path) != this.fingerprint.load(Ordering::Relaxed)
                    })
                    .await
                    .unwrap_or(false);
                    if changed {
                        let this = self.clone();
                        let _ = tokio::task::spawn_blocking(move || this.reload("file changed")).await;
                    }
                }
            }
        }
    }
}
