#!/usr/bin/env bash
# End-to-end tests: the official OpenAI Python SDK against `mantlegate serve` in front of
# `mantlegate simulate`. Usage: bash tests/e2e/run.sh [extra pytest args]
#
# Expects the binary at target/debug/mantlegate (or $MANTLEGATE_BIN); builds it when missing.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"

if [[ -z "${MANTLEGATE_BIN:-}" && ! -x target/debug/mantlegate ]]; then
    echo "e2e: target/debug/mantlegate is missing: cargo build" >&2
    cargo build
fi

if [[ ! -x .venv/bin/python ]]; then
    echo "e2e: creating .venv" >&2
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt

exec .venv/bin/python -m pytest -q -p no:cacheprovider tests/e2e "$@"
