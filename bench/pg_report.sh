#!/usr/bin/env bash
# Report times against ledger size (bench/report_bench.py does the work): fills scratch
# ledgers with calls over one month (October 2026), first BENCH_REPORT_SIZES' first size, then
# adding calls to the same month up to the next (1,000,000 then 10,000,000), rebuilds the
# per-day roll-up after each step the way the writer keeps it, and times the same reports at
# each size: `mantlegate report` grouped four ways, the month's spend by project and tag from
# the raw calls (what a new budget is seeded from), one day's export. Clean and junk-heavy
# (models never seen before, refused and answered: the roll-up files them under `(rejected)`
# and `(other)`), on PostgreSQL and SQLite. Writes bench/results/<UTC date>-pg-report.md.
#
# Settings (environment): BENCH_PG_URL (postgres://postgres@127.0.0.1:5432/: the server;
# scratch databases mg_bench_* are created on it and dropped at the end), BENCH_REPORT_SIZES
# (1000000,10000000), BENCH_REPORT_BACKENDS (postgres,sqlite), BENCH_REPORT_CASES (clean,junk),
# BENCH_REPORT_CHECK (1: first check the fill against the writer on a small ledger: export,
# import into an empty ledger, compare the reports), BENCH_SQLITE_DIR (where the SQLite files
# go; default a temporary directory), BENCH_NOTE (a line for the report), BENCH_RESULTS,
# BENCH_MANTLEGATE (the binary; default target/release/mantlegate, built if missing).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BENCH_MANTLEGATE:-$ROOT/target/release/mantlegate}
OUT=${BENCH_RESULTS:-$ROOT/bench/results/$(date -u +%F)-pg-report.md}
for t in psql sqlite3 python3; do
  command -v "$t" >/dev/null || {
    echo "bench/pg_report.sh needs $t (Debian: apt-get install postgresql-client sqlite3 python3)" >&2
    exit 1
  }
done
if [ ! -x "$BIN" ]; then
  cargo build --release --locked --bin mantlegate --manifest-path "$ROOT/Cargo.toml"
fi
check=()
[ "${BENCH_REPORT_CHECK:-1}" = 1 ] && check=(--check-writer)
sqlite_dir=()
[ -n "${BENCH_SQLITE_DIR:-}" ] && sqlite_dir=(--sqlite-dir "$BENCH_SQLITE_DIR")
python3 "$ROOT/bench/report_bench.py" --mantlegate "$BIN" \
  --pg "${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/}" \
  --sizes "${BENCH_REPORT_SIZES:-1000000,10000000}" \
  --backends "${BENCH_REPORT_BACKENDS:-postgres,sqlite}" \
  --cases "${BENCH_REPORT_CASES:-clean,junk}" \
  --note "${BENCH_NOTE:-}" --out "$OUT" "${check[@]}" "${sqlite_dir[@]}"
echo "written to $OUT"
