#!/usr/bin/env bash
# How fast reports answer from a large PostgreSQL ledger: fills a scratch database with
# BENCH_PG_ROWS (10,000,000) calls spread over one month (October 2026), with their per-day
# roll-up, the way the writer leaves them, then times `mantlegate report` over that month
# grouped a few ways, the month's spend by project and tag (what a new budget is seeded
# from), and one day's export. Writes bench/results/<UTC date>-pg-report.md.
#
# Settings (environment): BENCH_PG_URL (postgres://postgres@127.0.0.1:5432/test: the server;
# a database mg_bench_report is created on it and dropped at the end), BENCH_PG_ROWS,
# BENCH_MANTLEGATE (the binary; default target/release/mantlegate, built if missing).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PGOPTIONS="--client-min-messages=warning"
BASE=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
ROWS=${BENCH_PG_ROWS:-10000000}
DB=mg_bench_report
BIN=${BENCH_MANTLEGATE:-$ROOT/target/release/mantlegate}
URL="${BASE%/*}/$DB"
OUT=$ROOT/bench/results/$(date -u +%F)-pg-report.md

if [ ! -x "$BIN" ]; then
  cargo build --release --locked --bin mantlegate --manifest-path "$ROOT/Cargo.toml"
fi
WORK=$(mktemp -d)
cleanup() {
  psql -q "$BASE" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/mantlegate.toml" <<EOF
[upstream]
base_url = "http://127.0.0.1:9"
[[projects]]
name = "unused"
id = "proj_unused"
[ledger]
url = "$URL"
EOF

psql -q "$BASE" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
"$BIN" migrate --config "$WORK/mantlegate.toml" >/dev/null

# October 2026 UTC: 1790812800000 to 1793491200000 (ms).
echo "filling $ROWS calls..."
fill_started=$(date +%s)
psql -q -v ON_ERROR_STOP=1 "$URL" <<SQL
CREATE TABLE IF NOT EXISTS calls_2026_10 PARTITION OF calls
    FOR VALUES FROM (1790812800000) TO (1793491200000);
-- 40 projects with 4 teams and 3 environments, 120 keys, 6 models; a tenth of the calls
-- stream; one in fifty is refused.
INSERT INTO calls (ts_ms, request_id, key_name, key_fp, route, project_name, project_id, tags,
    api, model, stream, status, outcome, error_code, input_tokens, cached_input_tokens,
    output_tokens, reasoning_tokens, usage_source, cost_pico, duration_ms, ttfb_ms,
    upstream_response_id)
SELECT 1790812800000 + ((i - 1) * 2678400000::bigint / $ROWS),
    'req_' || i,
    'key-' || (i % 120), 'fp' || (i % 120), NULL,
    'project-' || (i % 40), 'proj_' || (i % 40),
    '{"Environment":"' || (ARRAY['prod','staging','dev'])[1 + i % 3] || '","Team":"team-' || (i % 4) || '"}',
    CASE WHEN i % 3 = 0 THEN 'responses' ELSE 'chat' END,
    (ARRAY['openai.gpt-oss-120b','openai.gpt-oss-20b','anthropic.claude-sonnet','meta.llama4','mistral.large','amazon.nova-pro'])[1 + i % 6],
    i % 10 = 0, CASE WHEN i % 50 = 0 THEN 429 ELSE 200 END,
    CASE WHEN i % 50 = 0 THEN 'rejected' ELSE 'forwarded' END,
    CASE WHEN i % 50 = 0 THEN 'rate_limit_exceeded' END,
    500 + i % 1000, i % 200, 100 + i % 400, i % 50, 'reported',
    (500 + i % 1000) * 150000 + (100 + i % 400) * 600000,
    40 + (i % 900), 30, NULL
FROM generate_series(1, $ROWS) AS i;
INSERT INTO daily
SELECT to_char(to_timestamp(ts_ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
    COALESCE(key_name, ''), COALESCE(route, ''), COALESCE(project_name, ''),
    COALESCE(project_id, ''), tags, COALESCE(api, ''), COALESCE(model, ''), outcome,
    count(*), sum(input_tokens), sum(cached_input_tokens), sum(output_tokens),
    sum(reasoning_tokens), COALESCE(sum(cost_pico), 0), count(*) FILTER (WHERE cost_pico IS NULL)
FROM calls GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9;
ANALYZE;
SQL
fill_secs=$(($(date +%s) - fill_started))
calls=$(psql -qtA "$URL" -c "SELECT count(*) FROM calls")
daily=$(psql -qtA "$URL" -c "SELECT count(*) FROM daily")
size=$(psql -qtA "$URL" -c "SELECT pg_size_pretty(pg_database_size('$DB'))")

# Best of three, in ms.
timed() {
  local best=""
  for _ in 1 2 3; do
    local t0 t1
    t0=$(date +%s%N)
    "$@" >"$WORK/out.txt" 2>/dev/null
    t1=$(date +%s%N)
    local ms=$(((t1 - t0) / 1000000))
    if [ -z "$best" ] || [ "$ms" -lt "$best" ]; then best=$ms; fi
  done
  echo "$best"
}

report() {
  "$BIN" report --config "$WORK/mantlegate.toml" --from 2026-10-01 --to 2026-11-01 --group-by "$1" --format csv
}
{
  echo "# PostgreSQL ledger: reports over a month of $calls calls, $(date -u +%FT%TZ)"
  echo
  echo "- Machine: $(nproc) cores, $(psql -qtA "$BASE" -c 'SHOW server_version') (Debian defaults); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- Ledger: $calls calls in October 2026 (one partition), $daily per-day roll-up rows, database $size; filled in $fill_secs s by bench/pg_report.sh"
  echo "- Times: wall clock of the whole command (process start, connection, query, output), best of 3"
  echo
  echo "| what | ms |"
  echo "|---|---:|"
  for dims in project project,model tag:Team,tag:Environment key,model,outcome; do
    echo "| \`mantlegate report --group-by $dims\` (the month) | $(timed report "$dims") |"
  done
  q="SELECT COALESCE(project_name, ''), tags, sum(cost_pico)::bigint FROM calls WHERE ts_ms >= 1790812800000 AND ts_ms < 1793491200000 AND cost_pico IS NOT NULL GROUP BY project_name, tags"
  echo "| the month's spend by project and tags from the raw calls (seeding a new budget) | $(timed psql -qtA "$URL" -c "$q") |"
  echo "| \`mantlegate ledger export\` of one day (about $((calls / 31)) calls) | $(timed "$BIN" ledger export --config "$WORK/mantlegate.toml" --from 2026-10-15 --to 2026-10-16) |"
} | tee "$OUT"
echo "written to $OUT"
