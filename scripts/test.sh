#!/usr/bin/env bash
# Runs every test: formatting, lints, the Rust unit and integration tests, the end-to-end tests
# that drive mantlegate with the official OpenAI Python SDK, and each fuzz target for a bounded
# time (FUZZ_SECONDS, 30 by default).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo deny (bans, licenses, sources; advisories need a network CI lacks)"
if ! command -v cargo-deny >/dev/null 2>&1; then
  cargo install cargo-deny --version 0.20.2 --locked --quiet
fi
cargo deny check bans licenses sources
echo "== cargo test"
cargo test --locked
echo "== OpenAI SDK end-to-end tests"
cargo build --locked
bash tests/e2e/run.sh
echo "== fuzz targets (each for ${FUZZ_SECONDS:-30} s)"
scripts/fuzz.sh
