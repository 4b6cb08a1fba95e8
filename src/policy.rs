//! Tag policy: AWS's rules for tag keys and values (the `[policy]` rules are in config.rs).

/// Checks a tag against AWS's tag rules (the rules cost allocation tags follow): key 1 to 128
/// characters, value 0 to 256, only letters, digits, white space and `_ . : / = + - @`, and
/// no key starting with the reserved `aws:`.
///
/// # Errors
/// Which rule the key or value breaks.
pub fn check_tag(key: &str, value: &str) -> Result<(), String> {
    let key_len = key.chars().count();
    if key_len == 0 || key_len > 128 {
        return Err(format!(
            "tag key `{key}` is {key_len} characters long; AWS allows 1 to 128"
        ));
    }
    if key.len() >= 4 && key[..4].eq_ignore_ascii_case("aws:") {
        return Err(format!(
            "tag key `{key}` starts with `aws:`, which AWS reserves for its own tags"
        ));
    }
    if let Some(c) = key.chars().find(|&c| !allowed(c)) {
        return Err(format!(
            "tag key `{key}` contains `{}`; AWS allows letters, digits, spaces and _ . : / = + - @",
            c.escape_default()
        ));
    }
    let value_len = value.chars().count();
    if value_len > 256 {
        return Err(format!(
            "the value of tag `{key}` is {value_len} characters long; AWS allows at most 256"
        ));
    }
    if let Some(c) = value.chars().find(|&c| !allowed(c)) {
        return Err(format!(
            "the value of tag `{key}` contains `{}`; AWS allows letters, digits, spaces and _ . : / = + - @",
            c.escape_default()
        ));
    }
    Ok(())
}

fn allowed(c: char) -> bool {
    c.is_alphanumeric() || (c.is_whitespace() && c != '\n' && c != '\r') || "_.:/=+-@".contains(c)
}

#[cfg(test)]
mod tests {
    use super::check_tag;

    #[test]
    fn aws_tag_rules() {
        assert!(check_tag("CostCenter", "CC-1001").is_ok());
        assert!(check_tag("Owner", "alice@example.com").is_ok());
        assert!(check_tag("Team", "").is_ok(), "empty values are allowed");
        assert!(
            check_tag("Équipe", "Données clients").is_ok(),
            "Unicode letters"
        );
        assert!(check_tag("", "x").unwrap_err().contains("1 to 128"));
        assert!(
            check_tag(&"k".repeat(129), "x")
                .unwrap_err()
                .contains("1 to 128")
        );
        assert!(
            check_tag("aws:createdBy", "x")
                .unwrap_err()
                .contains("reserves")
        );
        assert!(check_tag("AWS:x", "x").unwrap_err().contains("reserves"));
        assert!(
            check_tag("Team", &"v".repeat(257))
                .unwrap_err()
                .contains("256")
        );
        assert!(check_tag("Team!", "x").unwrap_err().contains("`!`"));
        assert!(check_tag("Team", "a;b").unwrap_err().contains("`;`"));
        assert!(check_tag("Team", "a\nb").is_err());
    }
}
