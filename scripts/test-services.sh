#!/usr/bin/env bash
# Makes sure the PostgreSQL and Redis servers of the tests answer, or says what to do and fails.
#
# MANTLEGATE_TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/test) must name a
# database on a server where its user may CREATE DATABASE (each test makes its own);
# MANTLEGATE_TEST_REDIS_URL (default redis://127.0.0.1:6379) a Redis the tests may write keys
# to (named uniquely per run, expiring within minutes). A server on this machine that is
# installed but not running is started: PostgreSQL through Debian's pg_ctlcluster, Redis as
# `redis-server --daemonize yes` without persistence. scripts/test.sh runs this first.
set -euo pipefail

PG_URL=${MANTLEGATE_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
REDIS_URL=${MANTLEGATE_TEST_REDIS_URL:-redis://127.0.0.1:6379}
# How long a server that was just started may take to answer.
START_WAIT=${MANTLEGATE_TEST_SERVICE_START_SECONDS:-30}

# The URL without its password, for messages.
shown() { sed -E 's#(://[^:/@]*):[^@/]*@#\1:*****@#' <<<"$1"; }

# "HOST PORT" of a URL (IPv6 hosts in brackets), DEFAULT_PORT when it names none.
host_port() {
  local rest=${1#*://}
  rest=${rest%%[/?#]*}
  rest=${rest##*@}
  local host port=$2
  if [[ $rest == \[* ]]; then
    host=${rest%%]*}
    host=${host#[}
    [[ $rest == *]:* ]] && port=${rest##*]:}
  elif [[ $rest == *:* ]]; then
    host=${rest%%:*}
    port=${rest##*:}
  else
    host=$rest
  fi
  echo "${host:-127.0.0.1} $port"
}

is_local() { [[ $1 == 127.* || $1 == localhost || $1 == ::1 ]]; }

# Whether something accepts TCP connections at HOST PORT (bash's /dev/tcp, 2 s at most).
tcp_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

# Empty when PostgreSQL at PG_URL takes the tests' work, else why not.
pg_problem() {
  if command -v psql >/dev/null 2>&1; then
    local out
    if ! out=$(PGCONNECT_TIMEOUT=3 psql -X -q -t -A -v ON_ERROR_STOP=1 "$PG_URL" \
      -c "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user" 2>&1); then
      echo "psql says: $(head -n 3 <<<"$out" | tr '\n' ' ')"
    elif [[ $out != t ]]; then
      echo "its user may not CREATE DATABASE (ALTER ROLE ... CREATEDB)"
    fi
  elif command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -t 3 -d "$PG_URL" || echo "pg_isready finds no server accepting connections"
  else
    local hp
    read -r -a hp <<<"$(host_port "$PG_URL" 5432)"
    tcp_open "${hp[0]}" "${hp[1]}" || echo "nothing accepts connections at ${hp[0]}:${hp[1]}"
  fi
}

# Empty when Redis at REDIS_URL answers PING, else why not.
redis_problem() {
  if command -v redis-cli >/dev/null 2>&1; then
    local out
    out=$(timeout 5 redis-cli --no-auth-warning -u "$REDIS_URL" ping 2>&1) || true
    [[ $out == PONG ]] || echo "redis-cli ping says: $(head -n 3 <<<"$out" | tr '\n' ' ')"
  else
    local hp
    read -r -a hp <<<"$(host_port "$REDIS_URL" 6379)"
    tcp_open "${hp[0]}" "${hp[1]}" || echo "nothing accepts connections at ${hp[0]}:${hp[1]}"
  fi
}

# Starts the installed local clusters; fails when there is none to start.
start_postgres() {
  local version started=1
  command -v pg_ctlcluster >/dev/null 2>&1 || return 1
  for version in /etc/postgresql/*/; do
    version=$(basename "$version")
    [ -d "/etc/postgresql/$version/main" ] || continue
    echo "starting PostgreSQL $version (cluster main)"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    started=0
  done
  return $started
}

# Starts redis-server on HOST PORT; fails when it is not installed.
start_redis() {
  command -v redis-server >/dev/null 2>&1 || return 1
  echo "starting redis-server on $1:$2"
  redis-server --daemonize yes --bind "$1" --port "$2" --save "" --appendonly no >/dev/null || true
}

# Polls CHECK until it reports no problem or START_WAIT seconds pass; prints the last problem.
wait_for() {
  local check=$1 problem deadline=$((SECONDS + START_WAIT))
  while problem=$($check) && [ -n "$problem" ] && ((SECONDS < deadline)); do
    sleep 0.2
  done
  echo "$problem"
}

failed=0

problem=$(pg_problem)
if [ -n "$problem" ]; then
  # Down on this machine (not merely refusing the user): start it if installed.
  read -r -a hp <<<"$(host_port "$PG_URL" 5432)"
  if is_local "${hp[0]}" && ! tcp_open "${hp[0]}" "${hp[1]}" && start_postgres; then
    problem=$(wait_for pg_problem)
  fi
fi
if [ -n "$problem" ]; then
  failed=1
  cat >&2 <<EOF
error: the PostgreSQL of the tests is not usable at $(shown "$PG_URL")
  ($problem)
  The PostgreSQL ledger and fleet tests need a server there whose user may CREATE DATABASE.
  Install PostgreSQL (Debian/Ubuntu: apt-get install postgresql; an installed local cluster is
  started here), allow the user in (trust for 127.0.0.1 in pg_hba.conf, or a password in the
  URL), create the database (createdb -h 127.0.0.1 -U postgres test), or point
  MANTLEGATE_TEST_POSTGRES_URL at a server that has all that.
EOF
fi

problem=$(redis_problem)
if [ -n "$problem" ]; then
  read -r -a hp <<<"$(host_port "$REDIS_URL" 6379)"
  if is_local "${hp[0]}" && ! tcp_open "${hp[0]}" "${hp[1]}" && start_redis "${hp[0]}" "${hp[1]}"; then
    problem=$(wait_for redis_problem)
  fi
fi
if [ -n "$problem" ]; then
  failed=1
  cat >&2 <<EOF
error: the Redis of the tests is not usable at $(shown "$REDIS_URL")
  ($problem)
  The shared rate-limit and fleet tests need it. Install Redis (Debian/Ubuntu: apt-get install
  redis-server; an installed redis-server is started here for a local URL), or point
  MANTLEGATE_TEST_REDIS_URL at a Redis that answers.
EOF
fi

if [ "$failed" = 1 ]; then
  exit 1
fi
echo "PostgreSQL at $(shown "$PG_URL") and Redis at $(shown "$REDIS_URL") answer"
