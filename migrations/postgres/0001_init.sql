-- mantlegate ledger, PostgreSQL schema version 1.
-- Applied by `mantlegate migrate` or at start, in one transaction under an advisory lock, and
-- recorded in schema_migrations. The columns mirror the SQLite ledger (src/ledger/sqlite.rs).

-- One row per call. Partitioned by month of ts_ms (UTC): partitions are named calls_YYYY_MM and
-- created by the writer ahead of time (the month of each record and the next); retention drops
-- whole partitions. (request_id, ts_ms) makes a retried batch idempotent.
CREATE TABLE calls (
    ts_ms BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    key_name TEXT,
    key_fp TEXT,
    route TEXT,
    project_name TEXT,
    project_id TEXT,
    tags TEXT NOT NULL DEFAULT '{}',
    api TEXT,
    model TEXT,
    stream BOOLEAN NOT NULL DEFAULT FALSE,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    error_code TEXT,
    input_tokens BIGINT NOT NULL DEFAULT 0,
    cached_input_tokens BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens BIGINT NOT NULL DEFAULT 0,
    usage_source TEXT NOT NULL,
    cost_pico BIGINT,
    duration_ms DOUBLE PRECISION NOT NULL,
    ttfb_ms DOUBLE PRECISION,
    upstream_response_id TEXT,
    PRIMARY KEY (request_id, ts_ms)
) PARTITION BY RANGE (ts_ms);

-- Declared on the parent, so every partition gets its own copy.
CREATE INDEX calls_ts ON calls (ts_ms);
CREATE INDEX calls_response ON calls (upstream_response_id)
    WHERE upstream_response_id IS NOT NULL;
CREATE INDEX calls_key_ts ON calls (key_fp, ts_ms);

-- One row per UTC day and combination of dimensions, upserted in the same transaction as the
-- calls: reports read this, and it stays when old partitions of calls are dropped.
CREATE TABLE daily (
    day TEXT COLLATE "C" NOT NULL,
    key_name TEXT NOT NULL,
    route TEXT NOT NULL,
    project_name TEXT NOT NULL,
    project_id TEXT NOT NULL,
    tags TEXT NOT NULL,
    api TEXT NOT NULL,
    model TEXT NOT NULL,
    outcome TEXT NOT NULL,
    requests BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    cost_pico BIGINT NOT NULL,
    unpriced_requests BIGINT NOT NULL,
    PRIMARY KEY (day, key_name, route, project_name, project_id, tags, api, model, outcome)
);

-- Background responses created but not yet seen finished; metered once, when they are.
CREATE TABLE pending_background (
    response_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    model TEXT,
    ts_ms BIGINT NOT NULL
);

-- Month-to-date priced spend per budget (month = YYYY-MM in the budget's time zone), added to
-- in the same transaction as the calls it counts: the figure every replica shares.
CREATE TABLE budget_spend (
    budget TEXT NOT NULL,
    month TEXT NOT NULL,
    spent_pico BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (budget, month)
);
