//! Caller keys: minting them, the `[[keys]]` block that stores only their SHA-256, and the
//! overview of the configured keys.

use std::collections::HashMap;

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::state::Snapshot;

/// A freshly minted key: `mg-` and 32 random bytes, URL-safe base64 (43 characters).
#[must_use]
pub fn mint() -> String {
    let mut bytes = [0u8; 32];
    // ThreadRng is a CSPRNG seeded from the OS (rand's documented guarantee).
    rand::fill(&mut bytes);
    format!(
        "mg-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Lowercase hex SHA-256 of a key, as `[[keys]] sha256` wants it.
#[must_use]
pub fn sha256_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The `[[keys]]` block for `key`, TOML-escaped.
#[must_use]
pub fn config_block(name: &str, key: &str, projects: &[String]) -> String {
    let quote = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let list = projects
        .iter()
        .map(|p| quote(p))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[[keys]]\nname = {}\nsha256 = \"{}\"\nprojects = [{list}]\n",
        quote(name),
        sha256_hex(key)
    )
}

/// A key entry's state: `disabled`, `expired` (at or past `expires_at`), `passthru` (it is
/// forwarded upstream as the caller's own Bedrock key) or `active`.
#[must_use]
pub fn state_of(
    disabled: bool,
    expires_at: Option<jiff::Timestamp>,
    passthrough: bool,
    now: jiff::Timestamp,
) -> &'static str {
    if disabled {
        "disabled"
    } else if expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else if passthrough {
        "passthru"
    } else {
        "active"
    }
}

/// The body of `GET /admin/v1/keys`: each key entry of the running config, sorted by name
/// then fingerprint, with its projects (by name, the first its default), expiry (RFC 3339 or
/// `null`), `disabled`, `passthrough`, state ([`state_of`]) and last use (RFC 3339, `null`
/// when the ledger has none). `last_used` maps a fingerprint (12 lowercase hex digits) to the
/// Unix milliseconds of its last call. Neither the SHA-256 nor any secret is in it.
#[must_use]
pub fn overview<S: std::hash::BuildHasher>(
    snapshot: &Snapshot,
    last_used: &HashMap<String, i64, S>,
    now: jiff::Timestamp,
) -> Value {
    let mut keys: Vec<_> = snapshot.keys_iter().collect();
    keys.sort_by(|a, b| {
        a.name
            .cmp(&b.name)
            .then_with(|| a.fingerprint.cmp(&b.fingerprint))
    });
    let data: Vec<Value> = keys
        .into_iter()
        .map(|k| {
            let projects: Vec<&str> = k
                .projects
                .iter()
                .map(|&p| &*snapshot.projects[p].name)
                .collect();
            let last = last_used
                .get(&*k.fingerprint)
                .and_then(|ms| jiff::Timestamp::from_millisecond(*ms).ok())
                .map(|t| t.to_string());
            json!({
                "object": "mantlegate.key",
                "name": &*k.name,
                "fingerprint": &*k.fingerprint,
                "projects": projects,
                "expires_at": k.expires_at.map(|t| t.to_string()),
                "disabled": k.disabled,
                "passthrough": k.passthrough,
                "state": state_of(k.disabled, k.expires_at, k.passthrough, now),
                "last_used": last,
            })
        })
        .collect();
    json!({ "object": "list", "data": data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_keys_are_long_random_and_url_safe() {
        let a = mint();
        let b = mint();
        assert_ne!(a, b);
        assert!(a.starts_with("mg-"));
        assert!(a.len() >= 3 + 43);
        assert!(
            a[3..]
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }

    #[test]
    fn block_parses_back_and_matches_the_key() {
        let key = mint();
        let block = config_block("chat \"bot\"", &key, &["A".into(), "B".into()]);
        let v: toml::Table = block.parse().expect("valid TOML");
        let entry = &v["keys"].as_array().expect("array")[0];
        assert_eq!(entry["name"].as_str(), Some("chat \"bot\""));
        assert_eq!(entry["sha256"].as_str(), Some(sha256_hex(&key).as_str()));
        assert!(!block.contains(&key));
    }
}
