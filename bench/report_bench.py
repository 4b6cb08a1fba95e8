#!/usr/bin/env python3
"""Report times against ledger size: bench/pg_report.sh's engine (standard library, plus `psql`).

For each backend (PostgreSQL, SQLite) and each case (clean; junk-heavy), fills a scratch ledger
with calls over one month (October 2026) in growing steps (--sizes, e.g. 1,000,000 then
10,000,000: the second step adds 9,000,000 calls to the same month), rebuilds the per-day
roll-up after each step exactly as the writer keeps it, and times the same report queries at
each size. Reports read the roll-up, so their time should not grow with the number of calls.

The calls: 40 projects (tags Environment and Team), 120 keys, 6 models, a tenth streamed, one
in fifty refused (429). Junk-heavy adds, in place of two in five of those calls:
  - one in five: a call to a model name never seen before that the upstream refuses (404); the
    roll-up files it under `(rejected)`, whatever its model;
  - one in five: a call from one of 4 scraper keys to a model name never seen before that the
    upstream answers (200, unpriced); past `max_models_per_day` distinct models in a key's day,
    the roll-up files them under `(other)`.
So a month of junk-heavy calls would give the roll-up one row per junk call without the bound.

The roll-up is filled the way the writer fills it: model `(rejected)` for a status outside
2xx; for a key's day, its first `max_models_per_day` distinct models (in the order they
arrive; junk names sort in that order, so the PostgreSQL writer's order within a batch, by
name, gives the same) keep their name, later ones go under `(other)`. --check-writer proves it
on a small ledger: it fills one, exports it with `mantlegate ledger export`, imports the export
into an empty ledger with `mantlegate ledger import` (the real writer's roll-up), and compares
the two ledgers' reports.
"""

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

MONTH_START = 1790812800000   # 2026-10-01T00:00:00Z
MONTH_MS = 2678400000         # 31 days
DAY_MS = 86400000
SCRAPERS = 4
GROUPINGS = ["project", "project,model", "tag:Team,tag:Environment", "key,model,outcome"]


def log(msg):
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# The calls, as SQL over an index i in (lo, hi]: the same expressions for both dialects where
# they can be, `pg` picks the other where they cannot.


def call_columns(pg, junk, lo, hi):
    """SELECT list of one call from `i` (the calls of this step spread evenly over the month)."""
    n = hi - lo
    ts = f"({MONTH_START} + (i - {lo} - 1) * {MONTH_MS} / {n})"
    pad8 = (lambda x: f"lpad(({x})::text, 8, '0')") if pg else (lambda x: f"printf('%08d', {x})")
    hexpad = ((lambda x, w: f"lpad(to_hex({x}), {w}, '0')") if pg
              else (lambda x, w: f"printf('%0{w}x', {x})"))
    cat = "||"
    arr = (lambda items, idx: f"(ARRAY[{', '.join(items)}])[1 + {idx}]") if pg else (
        lambda items, idx: "CASE " + " ".join(f"WHEN {idx} = {k} THEN {v}"
                                              for k, v in enumerate(items)) + " END")
    models = ["'openai.gpt-oss-120b'", "'openai.gpt-oss-20b'", "'anthropic.claude-sonnet'",
              "'meta.llama4'", "'mistral.large'", "'amazon.nova-pro'"]
    envs = ["'prod'", "'staging'", "'dev'"]
    true, false = ("TRUE", "FALSE") if pg else ("1", "0")
    # Junk kinds: 1 = refused, unknown model; 2 = a scraper key's unknown model, answered.
    kind = f"(CASE WHEN i % 5 = 1 THEN 1 WHEN i % 5 = 2 THEN 2 ELSE 0 END)" if junk else "0"
    junk_model = f"'zz-junk-' {cat} {ts} {cat} '-' {cat} {pad8('i')}"
    normal_key = f"'key-' {cat} (i % 120)"
    scraper_key = f"'scraper-' {cat} ((i / 5) % {SCRAPERS})"
    refused = f"(i % 50 = 0)"
    return f"""
    'mg_' {cat} {hexpad(ts, 12)} {cat} {hexpad('i', 20)} AS call_id,
    {ts} AS ts_ms,
    'req_' {cat} i AS request_id,
    CASE WHEN {kind} = 2 THEN {scraper_key} ELSE {normal_key} END AS key_name,
    CASE WHEN {kind} = 2 THEN 'fps' {cat} ((i / 5) % {SCRAPERS}) ELSE 'fp' {cat} (i % 120) END AS key_fp,
    NULL AS route,
    'project-' {cat} (i % 40) AS project_name,
    'proj_' {cat} (i % 40) AS project_id,
    '{{"Environment":"' {cat} {arr(envs, 'i % 3')} {cat} '","Team":"team-' {cat} (i % 4) {cat} '"}}' AS tags,
    CASE WHEN i % 3 = 0 THEN 'responses' ELSE 'chat.completions' END AS api,
    CASE WHEN {kind} > 0 THEN {junk_model} ELSE {arr(models, 'i % 6')} END AS model,
    CASE WHEN i % 10 = 0 THEN {true} ELSE {false} END AS stream,
    CASE WHEN {kind} = 1 THEN 404 WHEN {refused} THEN 429 ELSE 200 END AS status,
    CASE WHEN {kind} = 0 AND {refused} THEN 'rejected' ELSE 'forwarded' END AS outcome,
    CASE WHEN {kind} = 1 THEN 'model_not_found' WHEN {kind} = 0 AND {refused}
        THEN 'rate_limit_exceeded' END AS error_code,
    CASE WHEN {kind} = 1 THEN 0 ELSE 500 + i % 1000 END AS input_tokens,
    CASE WHEN {kind} = 1 THEN 0 ELSE i % 200 END AS cached_input_tokens,
    CASE WHEN {kind} = 1 THEN 0 ELSE 100 + i % 400 END AS output_tokens,
    CASE WHEN {kind} = 1 THEN 0 ELSE i % 50 END AS reasoning_tokens,
    CASE WHEN {kind} = 1 THEN 'missing' ELSE 'reported' END AS usage_source,
    CASE WHEN {kind} > 0 THEN NULL ELSE (500 + i % 1000) * 150000 + (100 + i % 400) * 600000
        END AS cost_pico,
    40 + (i % 900) AS duration_ms,
    30 AS ttfb_ms,
    CASE WHEN i % 3 = 0 AND {kind} <> 1 THEN 'resp_' {cat} {hexpad(f'(i * 2654435761) % 4294967296', 8)} {cat} {hexpad('i', 16)} END
        AS upstream_response_id"""


COLUMNS = ("call_id, ts_ms, request_id, key_name, key_fp, route, project_name, project_id, tags, "
           "api, model, stream, status, outcome, error_code, input_tokens, cached_input_tokens, "
           "output_tokens, reasoning_tokens, usage_source, cost_pico, duration_ms, ttfb_ms, "
           "upstream_response_id")


def rollup_sql(pg, max_models):
    """Rebuilds `daily` from `calls`, as the writer keeps it."""
    day = ("to_char(to_timestamp(c.d * 86400) AT TIME ZONE 'UTC', 'YYYY-MM-DD')" if pg
           else "date(c.d * 86400, 'unixepoch')")
    temp = "CREATE TEMP TABLE" if pg else "CREATE TEMP TABLE"
    return f"""
DELETE FROM daily;
DROP TABLE IF EXISTS kept;
-- A key's day keeps its first {max_models} distinct models (of calls answered 2xx).
{temp} kept AS
SELECT d, k, m FROM (
    SELECT d, k, m, row_number() OVER (PARTITION BY d, k ORDER BY f, m) AS nth
    FROM (SELECT ts_ms / {DAY_MS} AS d, COALESCE(key_name, '') AS k, COALESCE(model, '') AS m,
              min(ts_ms) AS f
          FROM calls WHERE status BETWEEN 200 AND 299 GROUP BY 1, 2, 3) firsts
) r WHERE nth <= {max_models};
CREATE INDEX kept_dkm ON kept (d, k, m);
INSERT INTO daily (day, key_name, route, project_name, project_id, tags, api, model, outcome,
    requests, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_pico,
    unpriced_requests)
SELECT {day}, c.k, c.route, c.project_name, c.project_id, c.tags, c.api, c.dm, c.outcome,
    count(*), sum(c.input_tokens), sum(c.cached_input_tokens), sum(c.output_tokens),
    sum(c.reasoning_tokens), COALESCE(sum(c.cost_pico), 0),
    sum(CASE WHEN c.cost_pico IS NULL THEN 1 ELSE 0 END)
FROM (
    SELECT calls.ts_ms / {DAY_MS} AS d, COALESCE(key_name, '') AS k, COALESCE(route, '') AS route,
        COALESCE(project_name, '') AS project_name, COALESCE(project_id, '') AS project_id,
        tags, COALESCE(api, '') AS api, outcome, input_tokens, cached_input_tokens,
        output_tokens, reasoning_tokens, cost_pico,
        CASE WHEN status NOT BETWEEN 200 AND 299 THEN '(rejected)'
             WHEN kept.m IS NULL THEN '(other)' ELSE kept.m END AS dm
    FROM calls LEFT JOIN kept ON kept.d = calls.ts_ms / {DAY_MS}
        AND kept.k = COALESCE(calls.key_name, '') AND kept.m = COALESCE(calls.model, '')
) c
GROUP BY c.d, c.k, c.route, c.project_name, c.project_id, c.tags, c.api, c.dm, c.outcome;
DROP TABLE kept;
"""


# ------------------------------------------------------------------------------------------
# Backends


class Postgres:
    name = "PostgreSQL"

    def __init__(self, base, db, work, max_models):
        self.base = base.rstrip("/")
        self.db = db
        self.url = f"{self.base}/{db}"
        self.admin = f"{self.base}/postgres"
        self.config = os.path.join(work, f"{db}.toml")
        self.max_models = max_models
        with open(self.config, "w") as f:
            f.write(f'[upstream]\nbase_url = "http://127.0.0.1:9"\n[[projects]]\nname = "unused"\n'
                    f'id = "proj_unused"\n[ledger]\nurl = "{self.url}"\n'
                    f"max_models_per_day = {max_models}\n")

    def psql(self, sql, url=None):
        out = subprocess.run(["psql", "-qAtX", "-v", "ON_ERROR_STOP=1", url or self.url],
                             input=sql, capture_output=True, text=True,
                             env={**os.environ, "PGOPTIONS": "--client-min-messages=warning"})
        if out.returncode:
            raise RuntimeError(f"psql: {out.stderr.strip()}")
        return out.stdout.strip()

    def create(self, mg):
        self.drop()
        self.psql(f"CREATE DATABASE {self.db}", self.admin)
        subprocess.run([mg, "migrate", "--config", self.config], check=True,
                       capture_output=True)
        self.psql("CREATE TABLE IF NOT EXISTS calls_2026_10 PARTITION OF calls "
                  f"FOR VALUES FROM ({MONTH_START}) TO ({MONTH_START + MONTH_MS})")

    def drop(self):
        self.psql(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)", self.admin)

    def add_calls(self, junk, lo, hi):
        self.psql(f"INSERT INTO calls ({COLUMNS}) SELECT {call_columns(True, junk, lo, hi)} "
                  f"FROM generate_series({lo + 1}, {hi}) AS i")

    def rebuild_rollup(self):
        self.psql("BEGIN;\n" + rollup_sql(True, self.max_models) + "COMMIT;\nANALYZE;")

    def scalar(self, sql):
        return self.psql(sql)

    def size(self):
        return int(self.psql(f"SELECT pg_database_size('{self.db}')"))

    def spend_argv(self):
        q = ("SELECT COALESCE(project_name, ''), tags, sum(cost_pico)::bigint FROM calls WHERE "
             f"ts_ms >= {MONTH_START} AND ts_ms < {MONTH_START + MONTH_MS} AND cost_pico IS NOT "
             "NULL GROUP BY project_name, tags")
        return ["psql", "-qAtX", self.url, "-c", q]


class Sqlite:
    name = "SQLite"

    def __init__(self, path, work, max_models):
        self.path = path
        self.config = os.path.join(work, os.path.basename(path) + ".toml")
        self.max_models = max_models
        with open(self.config, "w") as f:
            f.write(f'[upstream]\nbase_url = "http://127.0.0.1:9"\n[[projects]]\nname = "unused"\n'
                    f'id = "proj_unused"\n[ledger]\npath = "{path}"\n'
                    f"max_models_per_day = {max_models}\n")

    def create(self, mg):
        self.drop()
        subprocess.run([mg, "migrate", "--config", self.config], check=True,
                       capture_output=True)

    def drop(self):
        for suffix in ("", "-wal", "-shm"):
            try:
                os.remove(self.path + suffix)
            except FileNotFoundError:
                pass

    def connect(self):
        con = sqlite3.connect(self.path, isolation_level=None)
        con.execute("PRAGMA cache_size = -262144")   # 256 MiB
        con.execute("PRAGMA temp_store = FILE")
        return con

    def add_calls(self, junk, lo, hi):
        con = self.connect()
        try:
            con.execute("BEGIN")
            con.execute(
                f"INSERT INTO calls ({COLUMNS}) WITH RECURSIVE s(i) AS (SELECT {lo + 1} UNION ALL "
                f"SELECT i + 1 FROM s WHERE i < {hi}) SELECT {call_columns(False, junk, lo, hi)} "
                "FROM s")
            con.execute("INSERT OR REPLACE INTO key_last_used (key_fp, ts_ms) SELECT key_fp, "
                        "max(ts_ms) FROM calls WHERE key_fp IS NOT NULL GROUP BY key_fp")
            con.execute("COMMIT")
        finally:
            con.close()

    def rebuild_rollup(self):
        con = self.connect()
        try:
            con.executescript("BEGIN;\n" + rollup_sql(False, self.max_models) + "COMMIT;")
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            con.execute("ANALYZE")
        finally:
            con.close()

    def scalar(self, sql):
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            return "|".join(str(x) for x in con.execute(sql).fetchone())
        finally:
            con.close()

    def size(self):
        return sum(os.path.getsize(self.path + s) for s in ("", "-wal")
                   if os.path.exists(self.path + s))

    def spend_argv(self):
        q = ("SELECT COALESCE(project_name, ''), tags, sum(cost_pico) FROM calls WHERE "
             f"ts_ms >= {MONTH_START} AND ts_ms < {MONTH_START + MONTH_MS} AND cost_pico IS NOT "
             "NULL GROUP BY project_name, tags")
        return ["sqlite3", "-readonly", self.path, q]


# ------------------------------------------------------------------------------------------
# Timing


def timed(argv, runs=3):
    """Best wall-clock ms of `runs` runs of the whole command; raises if it fails."""
    best = None
    for _ in range(runs):
        t0 = time.monotonic()
        out = subprocess.run(argv, capture_output=True)
        ms = (time.monotonic() - t0) * 1000
        if out.returncode:
            raise RuntimeError(f"{argv[:3]}: {out.stderr.decode(errors='replace').strip()}")
        best = ms if best is None else min(best, ms)
    return best


def queries(mg, ledger):
    """(label, argv, reads the roll-up?) of what is timed."""
    out = []
    for dims in GROUPINGS:
        out.append((f"`mantlegate report --group-by {dims}` (the month)",
                    [mg, "report", "--config", ledger.config, "--from", "2026-10-01", "--to",
                     "2026-11-01", "--group-by", dims, "--format", "csv"], True))
    out.append(("the month's spend by project and tags from the raw calls (seeding a new "
                "budget)", ledger.spend_argv(), False))
    out.append(("`mantlegate ledger export` of one day", [mg, "ledger", "export", "--config",
                ledger.config, "--from", "2026-10-15", "--to", "2026-10-16"], False))
    return out


def measure(mg, ledger, junk, sizes):
    """Fills `ledger` step by step; returns one dict of figures per size."""
    ledger.create(mg)
    results = []
    have = 0
    for size in sizes:
        log(f"{ledger.name} {'junk-heavy' if junk else 'clean'}: adding calls {have + 1:,} to "
            f"{size:,}")
        t0 = time.monotonic()
        ledger.add_calls(junk, have, size)
        t1 = time.monotonic()
        ledger.rebuild_rollup()
        t2 = time.monotonic()
        have = size
        fig = {"calls": int(ledger.scalar("SELECT count(*) FROM calls")),
               "daily": int(ledger.scalar("SELECT count(*) FROM daily")),
               "junk_calls": int(ledger.scalar(
                   "SELECT count(*) FROM calls WHERE model LIKE 'zz-junk-%'")),
               "rolled": ledger.scalar(
                   "SELECT coalesce(sum(CASE WHEN model = '(rejected)' THEN requests END), 0), "
                   "coalesce(sum(CASE WHEN model = '(other)' THEN requests END), 0) FROM daily"),
               "size": ledger.size(), "fill_s": t1 - t0, "rollup_s": t2 - t1, "times": []}
        log(f"  {fig['calls']:,} calls, {fig['daily']:,} roll-up rows, "
            f"{fig['size'] / 2**20:,.0f} MiB; calls {fig['fill_s']:.0f} s, roll-up "
            f"{fig['rollup_s']:.0f} s")
        for label, argv, rollup in queries(mg, ledger):
            ms = timed(argv)
            fig["times"].append((label, ms, rollup))
            log(f"  {ms:8.0f} ms  {label}")
        results.append(fig)
    return results


def check_writer(mg, make, work):
    """Fills a small junk-heavy ledger, exports it, imports the export into an empty one (the
    real writer's roll-up), and compares the two ledgers' reports. Returns a line per backend."""
    lines = []
    for backend in ("postgres", "sqlite"):
        a, b = make(backend, "check_a", 10), make(backend, "check_b", 10)
        try:
            a.create(mg)
            a.add_calls(True, 0, 40000)
            a.rebuild_rollup()
            b.create(mg)
            export = os.path.join(work, f"{backend}-export.jsonl")
            with open(export, "w") as f:
                subprocess.run([mg, "ledger", "export", "--config", a.config, "--from",
                                "2026-10-01", "--to", "2026-11-01"], stdout=f, check=True,
                               stderr=subprocess.DEVNULL)
            subprocess.run([mg, "ledger", "import", "--config", b.config, "--input", export],
                           check=True, capture_output=True)
            # Eight dimensions, the most a report takes (every call's route is empty).
            dims = "day,key,project,api,model,outcome,tag:Team,tag:Environment"
            reps = [subprocess.run([mg, "report", "--config", x.config, "--from", "2026-10-01",
                                    "--to", "2026-11-01", "--group-by", dims, "--format", "csv"],
                                   capture_output=True, text=True, check=True).stdout
                    for x in (a, b)]
            rows = [int(x.scalar("SELECT count(*) FROM daily")) for x in (a, b)]
            other = a.scalar("SELECT coalesce(sum(requests), 0) FROM daily WHERE model = '(other)'")
            same = reps[0] == reps[1] and rows[0] == rows[1]
            lines.append((same, f"{a.name}: 40,000 junk-heavy calls, `max_models_per_day = 10`: "
                                f"filled roll-up {rows[0]:,} rows, the writer's (export, import) "
                                f"{rows[1]:,}; {int(other):,} calls under `(other)`; reports grouped by "
                                f"`{dims}` {'identical' if same else 'DIFFER'} "
                                f"({len(reps[0].splitlines()):,} lines)"))
            log(lines[-1][1])
        finally:
            a.drop()
            b.drop()
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mantlegate", required=True)
    p.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432/")
    p.add_argument("--sizes", default="1000000,10000000")
    p.add_argument("--backends", default="postgres,sqlite")
    p.add_argument("--cases", default="clean,junk")
    p.add_argument("--max-models", type=int, default=1000)
    p.add_argument("--check-writer", action="store_true")
    p.add_argument("--sqlite-dir", default=None, help="where the SQLite files go (default: temp)")
    p.add_argument("--note", default="")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = tempfile.mkdtemp(prefix="mantlegate-report-bench.")
    sqlite_dir = args.sqlite_dir or work
    tag = os.getpid()

    def make(backend, name, max_models):
        if backend == "postgres":
            return Postgres(args.pg, f"mg_bench_{name}_{tag}", work, max_models)
        return Sqlite(os.path.join(sqlite_dir, f"mg_bench_{name}_{tag}.db"), work, max_models)

    load_start = open("/proc/loadavg").read().split()[:3]
    checks = check_writer(args.mantlegate, make, work) if args.check_writer else []
    results = {}
    for backend in args.backends.split(","):
        for case in args.cases.split(","):
            ledger = make(backend, case, args.max_models)
            try:
                results[(backend, case)] = (ledger.name, measure(args.mantlegate, ledger,
                                                                  case == "junk", sizes))
            finally:
                ledger.drop()
    load_end = open("/proc/loadavg").read().split()[:3]
    write_report(args, sizes, results, checks, load_start, load_end)
    ok = all(same for same, _ in checks)
    return 0 if ok else 1


def write_report(args, sizes, results, checks, load_start, load_end):
    pgv = subprocess.run(["psql", "-qAtX", args.pg.rstrip("/") + "/postgres", "-c",
                          "SHOW server_version"], capture_output=True, text=True).stdout.strip()
    out = []
    add = out.append
    add(f"# Reports against ledger size, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    add("")
    add("`bench/pg_report.sh` (`bench/report_bench.py`): the same report queries over one month "
        "(October 2026) of a ledger filled to " + " and then ".join(f"{s:,}" for s in sizes)
        + " calls, clean and junk-heavy, on PostgreSQL and SQLite. Times are the wall clock of "
        "the whole command (process start, connection, query, output), best of 3.")
    add("")
    add(f"- Machine: {os.cpu_count()} cores; PostgreSQL {pgv} (Debian defaults), SQLite "
        f"{sqlite3.sqlite_version}; load average {' '.join(load_start)} at the start, "
        f"{' '.join(load_end)} at the end.")
    if args.note:
        add(f"- Note: {args.note}")
    add("- Clean: 40 projects, 120 keys, 6 models, a tenth streamed, one in fifty refused (429). "
        "Junk-heavy: one in five calls names a model never seen before that the upstream "
        "refuses (404: rolled up under `(rejected)`), one in five comes from one of 4 scraper "
        "keys with a model never seen before, answered (200: past "
        f"`max_models_per_day = {args.max_models}` in a key's day, rolled up under `(other)`).")
    add("- The roll-up is rebuilt after each fill step the way the writer keeps it (see "
        "`bench/report_bench.py`).")
    for same, line in checks:
        add(f"- Fill checked against the writer: {line}.")
    add("")
    for (backend, case), (name, figs) in results.items():
        add(f"## {name}, {'junk-heavy' if case == 'junk' else 'clean'}")
        add("")
        add("| | " + " | ".join(f"{f['calls']:,} calls" for f in figs) + " |" +
            (" ratio |" if len(figs) == 2 else ""))
        add("|---|" + "---:|" * (len(figs) + (1 if len(figs) == 2 else 0)))
        add("| roll-up rows | " + " | ".join(f"{f['daily']:,}" for f in figs) + " |" +
            (f" {figs[1]['daily'] / figs[0]['daily']:.2f} |" if len(figs) == 2 else ""))
        if case == "junk":
            add("| junk calls (a row each without the bound) | "
                + " | ".join(f"{f['junk_calls']:,}" for f in figs) + " |"
                + (" |" if len(figs) == 2 else ""))
            add("| calls under `(rejected)` / `(other)` | "
                + " | ".join(f"{int(f['rolled'].split('|')[0]):,} / "
                             f"{int(f['rolled'].split('|')[1]):,}" for f in figs) + " |"
                + (" |" if len(figs) == 2 else ""))
        add("| ledger size | " + " | ".join(f"{f['size'] / 2**20:,.0f} MiB" for f in figs) + " |"
            + (" |" if len(figs) == 2 else ""))
        add("| fill step: calls, roll-up rebuild | " + " | ".join(
            f"{f['fill_s']:.0f} s, {f['rollup_s']:.0f} s" for f in figs) + " |"
            + (" |" if len(figs) == 2 else ""))
        for k, (label, _, rollup) in enumerate(figs[0]["times"]):
            ms = [f["times"][k][1] for f in figs]
            add(f"| {label}{'' if rollup else ' (raw calls)'} | "
                + " | ".join(f"{m:,.0f} ms" for m in ms) + " |"
                + (f" {ms[1] / ms[0]:.2f} |" if len(figs) == 2 else ""))
        add("")
    text = "\n".join(out)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
