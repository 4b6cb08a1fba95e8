#!/usr/bin/env bash
# Runs every test: formatting, lints, licenses, that the Dockerfile's build context compiles, the
# Rust unit and integration tests, the end-to-end tests that drive mantlegate with the official
# OpenAI Python SDK, and each fuzz target for a bounded time (FUZZ_SECONDS, 30 by default).
#
# The PostgreSQL, Redis and fleet tests run against MANTLEGATE_TEST_POSTGRES_URL and
# MANTLEGATE_TEST_REDIS_URL, the local servers by default (started when installed and not
# running, see scripts/test-services.sh); when one cannot be reached the run stops at once and
# says what to do. No test is skipped here: MANTLEGATE_TEST_REQUIRE_SERVICES=1 turns a test
# that would skip into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

export MANTLEGATE_TEST_POSTGRES_URL="${MANTLEGATE_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
export MANTLEGATE_TEST_REDIS_URL="${MANTLEGATE_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
export MANTLEGATE_TEST_REQUIRE_SERVICES=1

echo "== PostgreSQL and Redis for the tests"
scripts/test-services.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo deny (bans, licenses, sources; advisories need a network CI lacks)"
if ! command -v cargo-deny >/dev/null 2>&1; then
  cargo install cargo-deny --version 0.20.2 --locked --quiet
fi
cargo deny check bans licenses sources
echo "== the Dockerfile's build context compiles"
scripts/check-docker-context.sh
echo "== cargo test"
cargo test --locked
echo "== OpenAI SDK end-to-end tests"
cargo build --locked
bash tests/e2e/run.sh
echo "== fuzz targets (each for ${FUZZ_SECONDS:-30} s)"
scripts/fuzz.sh
