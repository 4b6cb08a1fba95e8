//! The PostgreSQL and Redis servers some tests need: their URLs, or a visible skip.
//!
//! `scripts/test.sh` sets both URLs (the local servers by default, started when installed and
//! down) and `MANTLEGATE_TEST_REQUIRE_SERVICES=1`, so under it nothing is skipped: a missing
//! URL fails the test. A plain `cargo test` without the URLs skips these tests, each with a
//! `skipped:` line on stderr that the test harness does not swallow.

use std::io::Write as _;

/// The `PostgreSQL` server (a user that may `CREATE DATABASE`) the tests make databases on.
pub const POSTGRES_ENV: &str = "MANTLEGATE_TEST_POSTGRES_URL";
/// The Redis server of the shared rate-limit tests (keys are named uniquely per run).
pub const REDIS_ENV: &str = "MANTLEGATE_TEST_REDIS_URL";
/// Set to `1`: a test whose server URL is missing fails instead of being skipped.
pub const REQUIRE_ENV: &str = "MANTLEGATE_TEST_REQUIRE_SERVICES";

/// The URL in `env`, or `None` when it is unset or empty and `test` is skipped
/// ([`unavailable`]).
pub fn url(env: &str, test: &str) -> Option<String> {
    if let Ok(url) = std::env::var(env)
        && !url.is_empty()
    {
        return Some(url);
    }
    let local = match env {
        POSTGRES_ENV => "postgres://postgres@127.0.0.1:5432/test",
        REDIS_ENV => "redis://127.0.0.1:6379",
        _ => "the local server",
    };
    unavailable(
        test,
        &format!("{env} is not set (scripts/test.sh sets it, to {local} by default)"),
    );
    None
}

/// Skips `test`, which lacks what `why` says: writes `skipped: TEST because WHY` to stderr,
/// straight to the stream, not through `eprintln!`, whose output the test harness captures
/// and shows only for failed tests.
///
/// # Panics
/// When [`REQUIRE_ENV`] is `1`: then nothing may be skipped.
pub fn unavailable(test: &str, why: &str) {
    let required = std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{test} cannot run because {why}, and {REQUIRE_ENV}=1 forbids skipping it"
    );
    let line = format!("skipped: {test} because {why}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}
