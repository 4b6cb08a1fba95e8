//! Caller keys: minting them and the `[[keys]]` block that stores only their SHA-256.

use base64::Engine as _;
use sha2::{Digest, Sha256};

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
