//! What a new user meets from a clean clone: the fleet's config and compose file, the Rust
//! version the README, Cargo.toml and the Dockerfile state, the license.

use std::path::{Path, PathBuf};

use mantlegate::config::Config;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn fleet_example_config_loads_with_a_postgres_ledger_and_a_redis_store() {
    let config = Config::load(&repo("config/fleet.example.toml"))
        .unwrap_or_else(|e| panic!("config/fleet.example.toml: {e}"));
    let url = config.ledger.url.as_ref().expect("[ledger] url");
    assert!(
        url.expose().starts_with("postgres://"),
        "a PostgreSQL ledger"
    );
    let store = config.limits.store.as_deref().expect("[limits] store");
    assert!(store.starts_with("redis://"), "{store}");
    assert!(!config.rate_limits.is_empty(), "a limit the fleet shares");
    assert!(!config.budgets.is_empty(), "a budget the fleet shares");
    assert_eq!(config.upstream.api_key_env, "BEDROCK_API_KEY");
    assert_eq!(
        config.admin.token_env.as_deref(),
        Some("MANTLEGATE_ADMIN_TOKEN")
    );
}

#[test]
fn compose_runs_two_replicas_on_the_fleet_config_with_its_database_and_redis() {
    let compose = read("compose.yaml");
    let config = read("config/fleet.example.toml");
    for service in ["mantlegate-a", "mantlegate-b", "postgres", "redis"] {
        assert!(
            compose.contains(&format!("\n  {service}:\n")),
            "service {service}"
        );
    }
    assert!(
        compose.contains("./config/fleet.example.toml:/etc/mantlegate/mantlegate.toml:ro"),
        "the replicas run on the fleet config, where the image's CMD reads it"
    );
    // The config reaches the services by their compose names, with the database's password.
    let field = |key: &str| -> String {
        let line = compose
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
            .unwrap_or_else(|| panic!("{key} in compose.yaml"));
        line.trim().to_owned()
    };
    let url = format!(
        "postgres://{}:{}@postgres:5432/{}",
        field("POSTGRES_USER"),
        field("POSTGRES_PASSWORD"),
        field("POSTGRES_DB")
    );
    assert!(config.contains(&format!("url = \"{url}\"")), "{url}");
    assert!(config.contains("store = \"redis://redis:6379/0\""));
    // Both environment variables the config names are passed to the replicas.
    for env in ["BEDROCK_API_KEY", "MANTLEGATE_ADMIN_TOKEN"] {
        assert!(compose.contains(&format!("{env}: ${{{env}:?")), "{env}");
    }
}

/// `rust-version` of Cargo.toml, as numbers.
fn rust_version() -> (String, Vec<u32>) {
    let manifest: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    let version = manifest["package"]["rust-version"]
        .as_str()
        .expect("package.rust-version")
        .to_owned();
    let parts = version
        .split('.')
        .map(|p| p.parse().expect("a number"))
        .collect();
    (version, parts)
}

#[test]
fn the_readme_and_the_dockerfile_agree_with_rust_version() {
    let (version, wanted) = rust_version();
    assert!(
        read("README.md").contains(&format!("Rust {version} or newer")),
        "README.md states Rust {version}"
    );
    let dockerfile = read("Dockerfile");
    let tag = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .expect("a FROM rust: line")
        .split(['-', ' '])
        .next()
        .expect("a tag");
    let image: Vec<u32> = tag
        .split('.')
        .map(|p| p.parse().expect("a numeric rust image tag"))
        .collect();
    // A tag of fewer parts (1.95) is the newest release of that line.
    let compared = wanted.len().min(image.len());
    assert!(
        image[..compared] >= wanted[..compared],
        "rust:{tag} is older than rust-version {version}"
    );
}

#[test]
fn the_license_is_apache_2_0_as_cargo_toml_says() {
    let manifest: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    assert_eq!(manifest["package"]["license"].as_str(), Some("Apache-2.0"));
    let license = read("LICENSE");
    assert!(
        license.contains("Apache License\n                           Version 2.0, January 2004")
    );
    assert!(license.contains("END OF TERMS AND CONDITIONS"));
}
