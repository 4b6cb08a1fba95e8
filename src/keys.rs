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

/// `text` (a config file) with a `[[keys]]` entry for `key` added: `name`, the key's
/// `sha256` and `projects`, never the key itself. Edited in place with `toml_edit`, as `projects
/// apply` writes ids: every comment, blank line and other entry stays as it was. The entry
/// goes right after the last `[[keys]]` entry (into the array when `keys` is an inline array),
/// or at the end of the file when there is none.
///
/// # Errors
/// The text does not parse as TOML, or `keys` is neither an array of tables nor an array.
pub fn add_to_config(
    text: &str,
    name: &str,
    key: &str,
    projects: &[String],
) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let mut doc: toml_edit::DocumentMut = text.parse().context("not valid TOML")?;
    let list: toml_edit::Array = projects.iter().map(String::as_str).collect();
    let sha = sha256_hex(key);
    match doc.get_mut("keys") {
        Some(toml_edit::Item::ArrayOfTables(entries)) => {
            let mut entry = toml_edit::Table::new();
            entry.insert("name", toml_edit::value(name));
            entry.insert("sha256", toml_edit::value(sha));
            entry.insert("projects", toml_edit::value(list));
            entry.decor_mut().set_prefix("\n");
            // Printed in position order: the last entry's position, and after it.
            entry.set_position(entries.iter().filter_map(toml_edit::Table::position).max());
            entries.push(entry);
        }
        Some(toml_edit::Item::Value(toml_edit::Value::Array(entries))) => {
            let mut entry = toml_edit::InlineTable::new();
            entry.insert("name", name.into());
            entry.insert("sha256", sha.into());
            entry.insert("projects", toml_edit::Value::Array(list));
            entries.push(entry);
        }
        None => {
            let mut entry = toml_edit::Table::new();
            entry.insert("name", toml_edit::value(name));
            entry.insert("sha256", toml_edit::value(sha));
            entry.insert("projects", toml_edit::value(list));
            entry.decor_mut().set_prefix("\n");
            entry.set_position(Some(last_position(doc.as_table()).map_or(0, |p| p + 1)));
            let mut entries = toml_edit::ArrayOfTables::new();
            entries.push(entry);
            doc.insert("keys", toml_edit::Item::ArrayOfTables(entries));
        }
        Some(_) => anyhow::bail!("`keys` is not an array of [[keys]] tables"),
    }
    let mut out = doc.to_string();
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

/// The greatest position of `table` and the tables below it.
fn last_position(table: &toml_edit::Table) -> Option<isize> {
    let below = table.iter().filter_map(|(_, item)| match item {
        toml_edit::Item::Table(t) => last_position(t),
        toml_edit::Item::ArrayOfTables(a) => a.iter().filter_map(last_position).max(),
        _ => None,
    });
    below.chain(table.position()).max()
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

    const CONFIG: &str = r#"# mantlegate config
[upstream]
base_url = "https://x" # the endpoint

[[projects]]
name = "payments"
id = "proj_1"

# the app's key
[[keys]]
name = "app"
sha256 = "aaaa"
projects = ["payments"]

# routes below
[[routes]]
prefix = "/pay"
project = "payments"
"#;

    #[test]
    fn a_key_is_added_after_the_last_keys_entry_keeping_everything_else() {
        let key = mint();
        let out = add_to_config(CONFIG, "billing", &key, &["payments".into()]).expect("added");
        let block = format!(
            "\n[[keys]]\nname = \"billing\"\nsha256 = \"{}\"\nprojects = [\"payments\"]\n",
            sha256_hex(&key)
        );
        let expected = CONFIG.replace(
            "projects = [\"payments\"]\n\n# routes below",
            &format!("projects = [\"payments\"]\n{block}\n# routes below"),
        );
        assert_eq!(out, expected);
        assert!(!out.contains(&key), "never the key itself");
    }

    #[test]
    fn a_config_without_keys_gets_them_at_its_end() {
        let text = "[upstream]\nbase_url = \"https://x\"\n\n[[projects]]\nname = \"a\"\n";
        let out = add_to_config(&format!("{text}# last line\n"), "k", &mint(), &[]).expect("added");
        assert!(out.starts_with(text), "{out}");
        assert!(out.contains("\n[[keys]]\nname = \"k\"\n"), "{out}");
        assert!(out.ends_with("projects = []\n# last line\n"), "{out}");
        let inline = "keys = [{ name = \"a\", sha256 = \"b\" }]\n";
        let out = add_to_config(inline, "k", &mint(), &["P".into()]).expect("added");
        let parsed: toml::Table = out.parse().expect("TOML");
        assert_eq!(parsed["keys"].as_array().expect("array").len(), 2, "{out}");
        assert!(add_to_config("keys = 1\n", "k", &mint(), &[]).is_err());
        assert!(add_to_config("not [toml", "k", &mint(), &[]).is_err());
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
