#!/usr/bin/env bash
# mantlegate's benchmark: bench/run.sh [all|throughput|memory|ledger|profile|soak|fleet-soak]
#
#   throughput  wrk against the fake upstream: direct, through mantlegate, through nginx
#   memory      1,000 slow streams held open through mantlegate: peak RSS, every stream checked
#   ledger      the SQLite ledger writer alone: records/s, queue depth at the proxy's rate
#   profile     perf profile of mantlegate under non-streamed chat at c=64 (top functions;
#               BENCH_PROFILE_BODY=chat_stream|responses|responses_stream profiles another)
#   soak        10 minutes of mixed traffic (bench/soak.py): is memory flat, does the ledger
#               hold one record per call sent? Not part of `all`.
#   fleet-soak  30 minutes of mixed traffic over two replicas sharing a PostgreSQL ledger and a
#               Redis, with reloads, Redis killed, PostgreSQL cut off and stalled
#               (bench/fleet_soak.py): every call in the ledger once, budgets exact on both
#               replicas, memory flat? Needs psql, a PostgreSQL server and redis-server. Not
#               part of `all`.
#   all         throughput, memory, ledger (default)
#
# Settings (environment): BENCH_SECONDS (10) per measured run, BENCH_WARMUP (2) seconds,
# BENCH_RUNS (3), BENCH_LOAD_CORE (0) for wrk + fake upstream, BENCH_PROXY_CORE (1) for the
# proxy, BENCH_FRAMING (event: the upstream writes each stream event on its own; burst: all
# events of a stream at once), BENCH_MEM_STREAMS (1000), BENCH_MEM_HOLD_SECONDS (60),
# BENCH_BUILD (1: cargo build first), BENCH_MANTLEGATE (a mantlegate binary to measure instead
# of the one built, e.g. to compare two builds), BENCH_MANTLEGATE_LOG (info: one access log line
# per call; warn measures without them), BENCH_RESULTS (bench/results/<UTC date>[-<mode>].md),
# BENCH_KEEP (0: 1 keeps the temp dir), BENCH_FLOOR (0: 1 also measures bench/floor.rs, a bare
# proxy built from mantlegate's HTTP parts and doing none of its work; BENCH_FLOOR_WORK_US=N makes
# it also busy-wait N µs per call, a stand-in for a proxy's own work; BENCH_FLOOR_CLIENT=hyper also
# measures the floor forwarding through hyper's own HTTP/1 client, target floor-hyper, beside the
# floor with mantlegate's client), BENCH_SCENARIOS (all: a space-separated subset of
# chat_c1 chat_c64 chat_stream_c64 responses_stream_c64), BENCH_MANTLEGATE_BASE (another mantlegate
# binary, e.g. the previous build, measured in the same run as target mantlegate-base: a change
# on the request path reports its CPU per call side by side with the build before it). Soak: SOAK_SECONDS (600) of load, SOAK_SAMPLE_SECONDS
# (10) between memory samples, SOAK_CONCURRENCY (64) clients, SOAK_EVENT_DELAY_MS (5) between
# the upstream's stream events, SOAK_MIX (KIND=SHARE,... overriding bench/soak.py's default
# mix); the report goes to bench/results/soak-<UTC date>.md. Fleet soak: SOAK_SECONDS (1800),
# SOAK_SAMPLE_SECONDS (10), SOAK_CONCURRENCY (16), SOAK_EVENT_DELAY_MS (5), BENCH_PG_URL
# (postgres://postgres@127.0.0.1:5432/: a scratch database is made there and dropped),
# BENCH_NOTE (a line for the report); the report goes to bench/results/<UTC date>-fleet-soak.md.
# See bench/README.md for what each figure means.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${1:-all}
case "$MODE" in all | throughput | memory | ledger | profile | soak | fleet-soak) ;; *)
  echo "usage: bench/run.sh [all|throughput|memory|ledger|profile|soak|fleet-soak]" >&2
  exit 2
  ;;
esac

SECS=${BENCH_SECONDS:-10}
WARMUP=${BENCH_WARMUP:-2}
RUNS=${BENCH_RUNS:-3}
LOAD_CORE=${BENCH_LOAD_CORE:-0}
PROXY_CORE=${BENCH_PROXY_CORE:-1}
FRAMING=${BENCH_FRAMING:-event}
case "$FRAMING" in event | burst) ;; *)
  echo "BENCH_FRAMING must be event or burst" >&2
  exit 2
  ;;
esac
MEM_STREAMS=${BENCH_MEM_STREAMS:-1000}
MEM_HOLD=${BENCH_MEM_HOLD_SECONDS:-60}
SOAK_SECS=${SOAK_SECONDS:-600}
SOAK_SAMPLE=${SOAK_SAMPLE_SECONDS:-10}
SOAK_CONC=${SOAK_CONCURRENCY:-64}
if [ "$MODE" = fleet-soak ]; then
  SOAK_SECS=${SOAK_SECONDS:-1800}
  SOAK_CONC=${SOAK_CONCURRENCY:-16}
fi
SOAK_EVENT_DELAY=${SOAK_EVENT_DELAY_MS:-5}
SOAK_MIX=${SOAK_MIX:-}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
DATE=$(date -u +%Y-%m-%d)
# One report per day and mode: `all` writes <date>.md, the others <date>-<mode>.md.
SUFFIX=""
[ "$MODE" = all ] || SUFFIX=-$MODE
if [ "$MODE" = soak ]; then
  RESULTS=${BENCH_RESULTS:-$ROOT/bench/results/soak-$DATE.md}
else
  RESULTS=${BENCH_RESULTS:-$ROOT/bench/results/$DATE$SUFFIX.md}
fi
RAW=${RESULTS%.md}.log
# The client key of the benchmark's mantlegate config (public: it guards nothing).
KEY=mg-bench-0123456789abcdef
# Text deltas per stream (the fake upstream's --events).
EVENTS=20

# ------------------------------------------------------------------------------------------
# Tools

need_tools() {
  local missing=()
  local soaks=0
  case "$MODE" in soak | fleet-soak) soaks=1 ;; esac
  [ "$soaks" = 1 ] || command -v wrk >/dev/null || missing+=(wrk)
  [ "$MODE" = memory ] || [ "$MODE" = ledger ] || [ "$soaks" = 1 ] || command -v nginx >/dev/null || missing+=(nginx)
  if [ "$MODE" = fleet-soak ]; then
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v psql >/dev/null || missing+=(postgresql-client)
  fi
  if [ "$MODE" = profile ] && ! command -v perf >/dev/null; then missing+=(linux-perf); fi
  if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  local tools=(python3 taskset curl)
  [ "$soaks" = 1 ] || tools+=(wrk)
  [ "$MODE" = fleet-soak ] && tools+=(redis-server psql)
  for t in "${tools[@]}"; do
    command -v "$t" >/dev/null || {
      echo "bench/run.sh needs $t (Debian: apt-get install wrk python3 util-linux curl)" >&2
      exit 1
    }
  done
}

build() {
  if [ "${BENCH_BUILD:-1}" = 1 ] && [ "$MODE" = fleet-soak ]; then
    # The fleet soak needs the binary alone (its upstream is `mantlegate simulate`).
    echo "building (release): mantlegate"
    cargo build --release --locked --bin mantlegate
  elif [ "${BENCH_BUILD:-1}" = 1 ]; then
    echo "building (release): mantlegate, bench-upstream, ledger-bench, bench-floor"
    cargo build --release --locked --bin mantlegate --example bench-upstream --example ledger-bench --example bench-floor
  fi
  FLOOR_BIN=$TARGET_DIR/release/examples/bench-floor
  MG_BIN=${BENCH_MANTLEGATE:-$TARGET_DIR/release/mantlegate}
  UP_BIN=$TARGET_DIR/release/examples/bench-upstream
  LB_BIN=$TARGET_DIR/release/examples/ledger-bench
  local bins=("$MG_BIN" "$UP_BIN" "$LB_BIN")
  [ "$MODE" = fleet-soak ] && bins=("$MG_BIN")
  for b in "${bins[@]}"; do
    [ -x "$b" ] || {
      echo "missing $b: run with BENCH_BUILD=1" >&2
      exit 1
    }
  done
}

# ------------------------------------------------------------------------------------------
# Processes (each started here is stopped by its pid on exit)

PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}

# Waits until FILE has a line matching PATTERN; prints that line.
wait_line() {
  local file=$1 pattern=$2 i
  for i in $(seq 1 200); do
    if grep -m1 -e "$pattern" "$file" 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "timed out waiting for '$pattern' in $file:" >&2
  tail -5 "$file" >&2
  return 1
}

# start_upstream NAME [ARGS...]: sets UP_PID, UP_ADDR.
start_upstream() {
  local name=$1
  shift
  taskset -c "$LOAD_CORE" "$UP_BIN" --listen 127.0.0.1:0 --events "$EVENTS" "$@" >"$WORK/$name.out" 2>&1 &
  UP_PID=$!
  PIDS+=("$UP_PID")
  UP_ADDR=$(wait_line "$WORK/$name.out" 'listening on ' | sed 's/listening on //')
}

# write_mantlegate_config DIR UPSTREAM_ADDR: the real thing, keys, projects, prices, ledger.
write_mantlegate_config() {
  local dir=$1 upstream=$2 sha
  sha=$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)
  mkdir -p "$dir"
  cat >"$dir/mantlegate.toml" <<EOF
# Written by bench/run.sh.
[server]
listen = "127.0.0.1:0"

[upstream]
base_url = "http://$upstream"
api_key_env = "BENCH_BEDROCK_API_KEY"
default_prefix = "/v1"
[[upstream.model_prefixes]]
model = "openai.gpt-5*"
prefix = "/openai/v1"

[attribution]
on_missing = "reject"

[[projects]]
name = "CustomerChatbot-Prod"
id = "proj_benchchatbot"
tags = { Application = "CustomerChatbot", Environment = "Production", Team = "CustomerExperience", CostCenter = "CC-1001", Owner = "alice" }

[[projects]]
name = "DocSearch-Dev"
id = "proj_benchsearch"
tags = { Application = "DocSearch", Environment = "Development", Team = "Search", CostCenter = "CC-2002", Owner = "bob" }

[[projects]]
name = "Shared-Unattributed"
id = "proj_benchshared"
tags = { Application = "Unattributed", Environment = "Production", Team = "Platform", CostCenter = "CC-0000", Owner = "platform" }

# The key wrk sends: $KEY
[[keys]]
name = "bench-client"
sha256 = "$sha"
projects = ["CustomerChatbot-Prod", "DocSearch-Dev"]

[[keys]]
name = "search-team"
sha256 = "1f2e3d4c5b6a79880716253443526170f9e8d7c6b5a4938271605f4e3d2c1b0a"
projects = ["DocSearch-Dev"]

[[routes]]
prefix = "/chatbot"
project = "CustomerChatbot-Prod"

[ledger]
path = "$dir/ledger.db"
queue_capacity = 100000

[admin]
token_env = "BENCH_ADMIN_TOKEN"

[metrics]
tag_labels = ["Team", "Environment"]

[pricing]
builtin = true
EOF
  "$MG_BIN" check --config "$dir/mantlegate.toml" >/dev/null
}

# start_mantlegate DIR [drop-access]: sets MG_PID, MG_ADDR. JSON log lines (one per call) go to
# DIR/mantlegate.log; with drop-access, the access lines are written (and cost what they cost)
# but dropped as they come, so that a long run does not fill the disk.
start_mantlegate() {
  local dir=$1
  if [ "${2:-}" = drop-access ]; then
    BENCH_BEDROCK_API_KEY=bench-upstream-key BENCH_ADMIN_TOKEN=bench-admin-token MANTLEGATE_LOG=${BENCH_MANTLEGATE_LOG:-info},mantlegate::cli=info \
      taskset -c "$PROXY_CORE" "$MG_BIN" serve --config "$dir/mantlegate.toml" \
      > >(taskset -c "$LOAD_CORE" grep --line-buffered -v '"message":"access"' >>"$dir/mantlegate.log") 2>&1 &
  else
    BENCH_BEDROCK_API_KEY=bench-upstream-key BENCH_ADMIN_TOKEN=bench-admin-token MANTLEGATE_LOG=${BENCH_MANTLEGATE_LOG:-info},mantlegate::cli=info \
      taskset -c "$PROXY_CORE" "$MG_BIN" serve --config "$dir/mantlegate.toml" >>"$dir/mantlegate.log" 2>&1 &
  fi
  MG_PID=$!
  PIDS+=("$MG_PID")
  MG_ADDR=$(wait_line "$dir/mantlegate.log" '"message":"listening"' | sed 's/.*"addr":"\([^"]*\)".*/\1/')
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_floor UPSTREAM_ADDR [CLIENT]: the bare proxy (bench/floor.rs), forwarding with
# mantlegate's upstream client (ours, the default) or hyper's (hyper); sets FLOOR_PID, FLOOR_ADDR
# (for hyper: FLOOR_HYPER_PID, FLOOR_HYPER_ADDR).
start_floor() {
  local client=${2:-ours} out pid addr
  [ -x "$FLOOR_BIN" ] || {
    echo "missing $FLOOR_BIN: run with BENCH_BUILD=1" >&2
    exit 1
  }
  out=$WORK/floor.out
  [ "$client" = ours ] || out=$WORK/floor-$client.out
  taskset -c "$PROXY_CORE" "$FLOOR_BIN" --upstream "$1" --work-us "${BENCH_FLOOR_WORK_US:-0}" --client "$client" >"$out" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  addr=$(wait_line "$out" 'listening on ' | sed 's/listening on //')
  if [ "$client" = hyper ]; then
    FLOOR_HYPER_PID=$pid
    FLOOR_HYPER_ADDR=$addr
  else
    FLOOR_PID=$pid
    FLOOR_ADDR=$addr
  fi
}

# start_nginx UPSTREAM_ADDR: plain reverse proxy, one worker, keep-alive pool, no buffering.
start_nginx() {
  local upstream=$1 dir=$WORK/nginx port
  port=$(free_port)
  mkdir -p "$dir/tmp"
  cat >"$dir/nginx.conf" <<EOF
# Written by bench/run.sh: nginx as a plain reverse proxy, the baseline.
daemon off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
  access_log $dir/access.log;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  keepalive_requests 1000000;
  upstream fake {
    server $upstream;
    keepalive 256;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$port;
    location / {
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
EOF
  taskset -c "$PROXY_CORE" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" >"$dir/stdout.log" 2>&1 &
  NGX_PID=$!
  PIDS+=("$NGX_PID")
  NGX_ADDR=127.0.0.1:$port
  local i
  for i in $(seq 1 100); do
    curl -s -o /dev/null "http://$NGX_ADDR/" && return 0
    sleep 0.05
  done
  echo "nginx did not start:" >&2
  cat "$dir/error.log" "$dir/stdout.log" >&2
  exit 1
}

# ------------------------------------------------------------------------------------------
# Measurements

# CPU ticks (1/100 s) of the given pids, from /proc/PID/stat: `cpu_ticks all PID...` is user +
# system time (fields 14 and 15), `cpu_ticks user PID...` user time alone (field 14). With both,
# a proxy's CPU splits into its own code's time and the kernel's (sockets, wake-ups, file writes).
cpu_ticks() {
  local which=$1 total=0 p s f
  shift
  for p in "$@"; do
    s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    s=${s##*) }
    read -r -a f <<<"$s"
    total=$((total + f[11]))
    [ "$which" = user ] || total=$((total + f[12]))
  done
  echo "$total"
}

status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

proxy_pids() {
  case "$1" in
    mantlegate) echo "$MG_PID" ;;
    floor) echo "$FLOOR_PID" ;;
    floor-hyper) echo "$FLOOR_HYPER_PID" ;;
    mantlegate-base) echo "$BASE_PID" ;;
    nginx) echo "$NGX_PID $(pgrep -P "$NGX_PID" | tr '\n' ' ')" ;;
    direct) echo "" ;;
  esac
}

# metric NAME: a gauge from mantlegate's /metrics.
metric() {
  curl -s -H "Authorization: Bearer bench-admin-token" "http://$MG_ADDR/metrics" | awk -v m="$1" '$1 == m { print $2 }'
}

# Waits until mantlegate's ledger queue is empty.
drain_ledger() {
  local i q
  for i in $(seq 1 600); do
    q=$(metric mantlegate_ledger_queue_depth)
    [ "${q:-0}" = 0 ] && return 0
    sleep 0.05
  done
  echo "ledger queue did not drain (depth $q)" >&2
}

ledger_sql() {
  python3 - "$1" "$2" <<'EOF'
import sqlite3, sys
con = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
print("\t".join(str(x) for x in con.execute(sys.argv[2]).fetchone()))
EOF
}

# measure SCENARIO BODY CONCURRENCY TARGET ADDR RUN SECONDS: one wrk run, one line of runs.tsv.
measure() {
  local scenario=$1 body=$2 conc=$3 target=$4 addr=$5 run=$6 secs=$7
  local pids c0 c1 u0 u1 k0 k1 q_end=- q_max=- out line qfile=$WORK/qmax
  pids=$(proxy_pids "$target")
  # shellcheck disable=SC2086
  c0=$(cpu_ticks all $pids)
  # shellcheck disable=SC2086
  k0=$(cpu_ticks user $pids)
  u0=$(cpu_ticks all "$UP_PID")
  out=$WORK/wrk-$scenario-$target-$run.txt
  BENCH_BODY=$body BENCH_KEY=$KEY taskset -c "$LOAD_CORE" \
    wrk -t1 -c"$conc" -d"${secs}s" --latency -s "$ROOT/bench/wrk.lua" "http://$addr" >"$out" 2>&1 &
  local wrk_pid=$!
  if [ "$target" = mantlegate ]; then
    # Ledger queue depth, sampled once a second while the load runs.
    echo 0 >"$qfile"
    (
      m=0
      while kill -0 "$wrk_pid" 2>/dev/null; do
        sleep 1
        q=$(taskset -c "$LOAD_CORE" curl -s -H "Authorization: Bearer bench-admin-token" "http://$MG_ADDR/metrics" | awk '$1 == "mantlegate_ledger_queue_depth" { print $2 }')
        [ "${q:-0}" -gt "$m" ] && m=$q && echo "$m" >"$qfile"
      done
    ) &
    local sampler=$!
  fi
  wait "$wrk_pid" || true
  u1=$(cpu_ticks all "$UP_PID")
  if [ "$target" = mantlegate ]; then
    wait "$sampler" || true
    q_end=$(metric mantlegate_ledger_queue_depth)
    q_max=$(cat "$qfile")
    # The window ends once the ledger has written this run's records: their cost counts.
    drain_ledger
  fi
  # shellcheck disable=SC2086
  c1=$(cpu_ticks all $pids)
  # shellcheck disable=SC2086
  k1=$(cpu_ticks user $pids)
  {
    echo "## $scenario $target $run"
    cat "$out"
  } >>"$RAW"
  line=$(grep '^@@bench' "$out" || true)
  if [ -z "$line" ]; then
    echo "wrk failed ($scenario $target $run):" >&2
    cat "$out" >&2
    exit 1
  fi
  # name=value pairs -> tab-separated row
  local kv
  kv=$(echo "${line#@@bench }" | tr ' ' '\n' | cut -d= -f2 | tr '\n' '\t')
  local cpu=- user=-
  [ "$target" != direct ] && cpu=$((c1 - c0)) && user=$((k1 - k0))
  printf '%s\t%s\t%s\t%s\t%s%s\t%s\t%s\t%s\t%s\n' "$scenario" "$conc" "$target" "$run" "$kv" "$cpu" "$((u1 - u0))" "$q_end" "$q_max" "$user" >>"$WORK/runs.tsv"
  # Keep the access logs from filling the disk: their writing is measured, their bytes are not kept.
  if [ "$target" = mantlegate ]; then
    grep -v '"message":"access"' "$WORK/mg/mantlegate.log" >>"$WORK/mg/other.log" || true
    : >"$WORK/mg/mantlegate.log"
  fi
  if [ "$target" = mantlegate-base ]; then : >"$WORK/mg-base/mantlegate.log"; fi
  if [ "$target" = nginx ]; then : >"$WORK/nginx/access.log"; fi
  printf '  %-22s %-10s %-7s %s\n' "$scenario" "$target" "$run" "${line#@@bench }"
}

# Checks that each target relays each call whole: body size and SSE event count.
sanity() {
  local body path payload target addr
  echo "relay check (bytes, SSE data lines) per call and target:" | tee -a "$RAW"
  for body in chat chat_stream responses responses_stream; do
    case $body in
      chat*) path=/v1/chat/completions ;;
      *) path=/v1/responses ;;
    esac
    payload='{"model":"openai.gpt-oss-120b","input":"hi","messages":[{"role":"user","content":"hi"}]'
    [[ $body = *stream ]] && payload+=',"stream":true'
    payload+='}'
    for target in "${TARGETS[@]}"; do
      addr=$(target_addr "$target")
      curl -s -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
        -d "$payload" "http://$addr$path" -o "$WORK/sanity-$body-$target"
      printf '  %-17s %-10s %6s bytes %3s data lines\n' "$body" "$target" \
        "$(wc -c <"$WORK/sanity-$body-$target")" "$(grep -c '^data:' "$WORK/sanity-$body-$target" || true)" | tee -a "$RAW"
    done
  done
}

target_addr() {
  case "$1" in
    direct) echo "$UP_ADDR" ;;
    mantlegate) echo "$MG_ADDR" ;;
    floor) echo "$FLOOR_ADDR" ;;
    floor-hyper) echo "$FLOOR_HYPER_ADDR" ;;
    mantlegate-base) echo "$BASE_ADDR" ;;
    nginx) echo "$NGX_ADDR" ;;
  esac
}

SCENARIOS=(
  "chat_c1 chat 1"
  "chat_c64 chat 64"
  "chat_stream_c64 chat_stream 64"
  "responses_stream_c64 responses_stream 64"
)

throughput() {
  if [ "$FRAMING" = burst ]; then start_upstream upstream --burst; else start_upstream upstream; fi
  write_mantlegate_config "$WORK/mg" "$UP_ADDR"
  start_mantlegate "$WORK/mg"
  TARGETS=(direct mantlegate)
  if [ -n "${BENCH_MANTLEGATE_BASE:-}" ]; then
    # The build to compare against, with the same config, its own ledger and log.
    local mg_bin=$MG_BIN mg_pid=$MG_PID mg_addr=$MG_ADDR
    MG_BIN=$BENCH_MANTLEGATE_BASE
    write_mantlegate_config "$WORK/mg-base" "$UP_ADDR"
    start_mantlegate "$WORK/mg-base"
    BASE_PID=$MG_PID BASE_ADDR=$MG_ADDR
    MG_BIN=$mg_bin MG_PID=$mg_pid MG_ADDR=$mg_addr
    TARGETS+=(mantlegate-base)
  fi
  if command -v nginx >/dev/null; then
    start_nginx "$UP_ADDR"
    TARGETS+=(nginx)
  else
    echo "nginx is not installed: measuring direct and mantlegate only" | tee -a "$RAW"
  fi
  if [ "${BENCH_FLOOR:-0}" = 1 ] || [ "${BENCH_FLOOR_CLIENT:-ours}" = hyper ]; then
    start_floor "$UP_ADDR"
    TARGETS+=(floor)
  fi
  if [ "${BENCH_FLOOR_CLIENT:-ours}" = hyper ]; then
    # The same floor forwarding through hyper's client: the two weigh the upstream clients.
    start_floor "$UP_ADDR" hyper
    TARGETS+=(floor-hyper)
  fi
  echo "upstream $UP_ADDR (core $LOAD_CORE), mantlegate $MG_ADDR (core $PROXY_CORE)${NGX_ADDR:+, nginx $NGX_ADDR (core $PROXY_CORE)}"
  sanity
  # Both proxies write one access log line per call to a file (opened for appending), emptied
  # after each run; mantlegate's other lines are kept in other.log.
  local s scenario body conc run target rows0 rows
  for s in "${SCENARIOS[@]}"; do
    read -r scenario body conc <<<"$s"
    if [ -n "${BENCH_SCENARIOS:-}" ] && [[ " $BENCH_SCENARIOS " != *" $scenario "* ]]; then
      continue
    fi
    drain_ledger
    rows0=$(ledger_sql "$WORK/mg/ledger.db" "SELECT coalesce(max(id), 0) FROM calls")
    for target in "${TARGETS[@]}"; do
      measure "$scenario" "$body" "$conc" "$target" "$(target_addr "$target")" warmup "$WARMUP"
    done
    for run in $(seq 1 "$RUNS"); do
      # Targets interleaved, so that drift on a shared machine hits all of them alike.
      for target in "${TARGETS[@]}"; do
        measure "$scenario" "$body" "$conc" "$target" "$(target_addr "$target")" "$run" "$SECS"
      done
    done
    drain_ledger
    rows=$(ledger_sql "$WORK/mg/ledger.db" "SELECT count(*), coalesce(sum(outcome = 'forwarded'), 0),
      coalesce(sum(outcome = 'client_disconnect'), 0), coalesce(sum(outcome NOT IN ('forwarded', 'client_disconnect')), 0),
      coalesce(sum(outcome = 'forwarded' AND usage_source = 'reported'), 0), coalesce(sum(status <> 200), 0)
      FROM calls WHERE id > $rows0")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$scenario" "$conc" "$rows" "$(status_kb "$MG_PID" VmHWM)" \
      "$(metric mantlegate_ledger_records_dropped)" "$((RUNS + 1))" >>"$WORK/ledger.tsv"
  done
  grep -v '"message":"access"' "$WORK/mg/mantlegate.log" >>"$WORK/mg/other.log" || true
  echo "## mantlegate log lines other than access lines" >>"$RAW"
  cat "$WORK/mg/other.log" >>"$RAW"
  if [ -f "$WORK/nginx/error.log" ]; then
    echo "## nginx error log" >>"$RAW"
    cat "$WORK/nginx/error.log" >>"$RAW"
  fi
  kill "$MG_PID" "$UP_PID" 2>/dev/null || true
  [ -n "${BASE_PID:-}" ] && kill "$BASE_PID" 2>/dev/null || true
  [ -n "${NGX_PID:-}" ] && kill "$NGX_PID" 2>/dev/null || true
  wait "$MG_PID" "$UP_PID" 2>/dev/null || true
}

memory() {
  # Events spaced so that a stream lasts about MEM_HOLD seconds (~25 events per stream).
  local delay=$((MEM_HOLD * 1000 / 25))
  start_upstream upstream-slow --event-delay-ms "$delay"
  local slow_pid=$UP_PID
  write_mantlegate_config "$WORK/mem" "$UP_ADDR"
  start_mantlegate "$WORK/mem"
  sleep 0.5
  local idle_rss
  idle_rss=$(status_kb "$MG_PID" VmRSS)
  echo "memory: $MEM_STREAMS streams of $EVENTS deltas ${delay} ms apart through mantlegate $MG_ADDR (idle RSS ${idle_rss} KiB)"
  local max_rss=0 max_inflight=0 r f
  taskset -c "$LOAD_CORE" python3 "$ROOT/bench/streams.py" --addr "$MG_ADDR" --key "$KEY" \
    --streams "$MEM_STREAMS" --deltas "$EVENTS" --timeout $((MEM_HOLD * 3)) >"$WORK/streams.json" 2>"$WORK/streams.err" &
  local client=$!
  while kill -0 "$client" 2>/dev/null; do
    r=$(status_kb "$MG_PID" VmRSS)
    [ "$r" -gt "$max_rss" ] && max_rss=$r
    f=$(metric mantlegate_in_flight_requests)
    [ "${f:-0}" -gt "$max_inflight" ] && max_inflight=$f
    sleep 0.5
  done
  local rc=0
  wait "$client" || rc=$?
  cat "$WORK/streams.err" >>"$RAW"
  drain_ledger
  local rows
  rows=$(ledger_sql "$WORK/mem/ledger.db" "SELECT count(*), coalesce(sum(outcome = 'forwarded' AND usage_source = 'reported'), 0) FROM calls")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$MEM_STREAMS" "$delay" "$idle_rss" "$max_rss" \
    "$(status_kb "$MG_PID" VmHWM)" "$max_inflight" "$rows" "$(cat "$WORK/streams.json")" >"$WORK/memory.tsv"
  echo "  client: $(cat "$WORK/streams.json")"
  grep -v '"message":"access"' "$WORK/mem/mantlegate.log" >>"$RAW" || true
  kill "$MG_PID" "$slow_pid" 2>/dev/null || true
  wait "$MG_PID" "$slow_pid" 2>/dev/null || true
  [ "$rc" = 0 ] || echo "memory scenario: some streams failed (see above)" >&2
}

ledger() {
  # Burst: what one writer sustains. Paced: the proxy's best non-streamed rate of this run
  # (or 50,000/s), offered steadily for BENCH_SECONDS: does the queue stay flat?
  local rate=50000
  if [ -f "$WORK/runs.tsv" ]; then
    rate=$(awk -F'\t' '$3 == "mantlegate" && $4 != "warmup" && $5 / ($6 / 1e6) > r { r = $5 / ($6 / 1e6) } END { printf "%d", (r > 0 ? r : 50000) }' "$WORK/runs.tsv")
  fi
  echo "ledger writer: burst of 200000 records, then $rate records/s for ${SECS} s (core $PROXY_CORE)"
  taskset -c "$PROXY_CORE" "$LB_BIN" --db "$WORK/ledger-burst.db" --records 200000 2>>"$RAW" | tee -a "$WORK/ledger-bench.txt"
  taskset -c "$PROXY_CORE" "$LB_BIN" --db "$WORK/ledger-paced.db" --rate "$rate" --seconds "$SECS" 2>>"$RAW" | tee -a "$WORK/ledger-bench.txt"
}

soak() {
  # Streams last about 25 events x SOAK_EVENT_DELAY_MS, as a model generating tokens; a client
  # that hangs up after the first event leaves mid-stream.
  start_upstream upstream-soak --event-delay-ms "$SOAK_EVENT_DELAY"
  local up_pid=$UP_PID
  write_mantlegate_config "$WORK/soak" "$UP_ADDR"
  start_mantlegate "$WORK/soak" drop-access
  echo "soak: ${SOAK_SECS} s of mixed traffic from $SOAK_CONC clients through mantlegate $MG_ADDR (pid $MG_PID, core $PROXY_CORE), upstream $UP_ADDR (core $LOAD_CORE)"
  local rc=0
  taskset -c "$LOAD_CORE" python3 "$ROOT/bench/soak.py" --addr "$MG_ADDR" --key "$KEY" \
    --pid "$MG_PID" --ledger "$WORK/soak/ledger.db" --mantlegate "$MG_BIN" \
    --seconds "$SOAK_SECS" --sample "$SOAK_SAMPLE" --concurrency "$SOAK_CONC" \
    --event-delay-ms "$SOAK_EVENT_DELAY" --mix "$SOAK_MIX" >"$RESULTS" 2> >(tee -a "$RAW" >&2) || rc=$?
  kill "$MG_PID" "$up_pid" 2>/dev/null || true
  wait "$MG_PID" "$up_pid" 2>/dev/null || true
  {
    echo "## mantlegate log lines other than access lines"
    cat "$WORK/soak/mantlegate.log"
  } >>"$RAW"
  cat "$RESULTS"
  echo
  echo "results: $RESULTS (progress and mantlegate's other log lines: $RAW)"
  [ "$rc" = 0 ] || echo "soak: memory grew, the ledger does not match the calls sent, or calls failed (see the report)" >&2
  return "$rc"
}

fleet_soak() {
  echo "fleet soak: ${SOAK_SECS} s of mixed traffic from $SOAK_CONC clients over two replicas"
  local rc=0
  python3 "$ROOT/bench/fleet_soak.py" --mantlegate "$MG_BIN" --seconds "$SOAK_SECS" \
    --sample "$SOAK_SAMPLE" --concurrency "$SOAK_CONC" --event-delay-ms "$SOAK_EVENT_DELAY" \
    --pg "${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/}" --note "${BENCH_NOTE:-}" \
    --out "$RESULTS" --log "$RAW" 2> >(tee -a "$RAW" >&2) >/dev/null || rc=$?
  cat "$RESULTS"
  echo
  echo "results: $RESULTS (progress and the replicas' log lines other than access lines: $RAW)"
  [ "$rc" = 0 ] || echo "fleet soak: a check failed (see the report's verdict)" >&2
  return "$rc"
}

profile() {
  command -v perf >/dev/null || {
    echo "profile needs perf (Debian: apt-get install linux-perf)" >&2
    exit 1
  }
  start_upstream upstream
  write_mantlegate_config "$WORK/mg" "$UP_ADDR"
  start_mantlegate "$WORK/mg"
  local out=$RESULTS
  local body=${BENCH_PROFILE_BODY:-chat}
  echo "profiling mantlegate under $body, c=64, for ${SECS} s"
  BENCH_BODY=$body BENCH_KEY=$KEY taskset -c "$LOAD_CORE" wrk -t1 -c64 -d"$((SECS + WARMUP + 1))s" -s "$ROOT/bench/wrk.lua" "http://$MG_ADDR" >"$WORK/wrk-profile.txt" 2>&1 &
  local wrk_pid=$!
  sleep "$WARMUP"
  # cpu-clock works without hardware counters (VMs); DWARF call chains, as release builds
  # have no frame pointers.
  taskset -c "$LOAD_CORE" perf record -e cpu-clock -F 499 --call-graph dwarf,16384 -p "$MG_PID" \
    -o "$WORK/perf.data" -- sleep "$SECS" 2>>"$RAW"
  wait "$wrk_pid" || true
  local report=(perf report -i "$WORK/perf.data" --stdio -g none)
  local tidy=(sed -e '/^#/d' -e '/^$/d' -e 's/[[:space:]]*$//')
  {
    echo "# perf profile of mantlegate, $body, c=64, $(date -u +%FT%TZ)"
    echo
    echo '```'
    grep -E 'Requests/sec|@@bench' "$WORK/wrk-profile.txt"
    echo
    echo "## Self time by function (top 40)"
    "${report[@]}" --no-children --sort dso,sym 2>/dev/null | "${tidy[@]}" | head -40 || true
    echo
    echo "## Self time by shared object"
    "${report[@]}" --no-children --sort dso 2>/dev/null | "${tidy[@]}" | head -8 || true
    echo
    echo "## Inclusive time of the parts of a call (>= 1 %)"
    "${report[@]}" --children --sort sym 2>/dev/null | "${tidy[@]}" |
      grep -E 'mantlegate::|Event::dispatch|sqlite3_step|pagerWalFrames|__GI___writev|__libc_pwrite|Ledger::record|do_futex|PendingRequest|RelayBody|handle_connection::\{\{closure|Dispatcher<D,Bs,I,T>::poll_(read|write)' |
      awk '$1 + 0 >= 1' | cut -c1-220 | head -50 || true
    echo '```'
  } >"$out"
  echo "profile written to $out"
}

# ------------------------------------------------------------------------------------------

need_tools
build
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mantlegate-bench.XXXXXX")
trap cleanup EXIT
mkdir -p "$(dirname "$RESULTS")"
: >"$RAW"
ulimit -n 65536 2>/dev/null || true
# Other work on the machine skews every figure: the report shows the load around the run.
cut -d' ' -f1-3 /proc/loadavg >"$WORK/loadavg"

case "$MODE" in
  profile)
    profile
    exit 0
    ;;
  soak)
    soak
    exit 0
    ;;
  fleet-soak)
    fleet_soak
    exit 0
    ;;
  throughput) throughput ;;
  memory) memory ;;
  ledger) ledger ;;
  all)
    throughput
    memory
    ledger
    ;;
esac

cut -d' ' -f1-3 /proc/loadavg >>"$WORK/loadavg"
python3 "$ROOT/bench/summarize.py" "$WORK" \
  --settings "seconds=$SECS warmup=$WARMUP runs=$RUNS load_core=$LOAD_CORE proxy_core=$PROXY_CORE stream_framing=$FRAMING floor_work_us=${BENCH_FLOOR_WORK_US:-0} floor_client=${BENCH_FLOOR_CLIENT:-ours}" \
  --mantlegate "$MG_BIN" >"$RESULTS"
cat "$RESULTS"
echo
echo "results: $RESULTS (raw wrk output and logs: $RAW)"
