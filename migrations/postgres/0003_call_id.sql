-- A call's identity is mantlegate's own call id. request_id is what the client saw in
-- x-request-id: the upstream's id when it sent one, and an upstream or gateway may echo
-- whatever the client sent, so many calls can share it. Keyed on (request_id, ts_ms), calls
-- with one client-chosen id in the same millisecond were one row, and the others vanished from
-- calls, daily and budget_spend. request_id stays, a plain column.

ALTER TABLE calls ADD COLUMN call_id TEXT;

-- Calls recorded before get an id derived from the identity they had, as
-- mantlegate::ledger::legacy_call_id computes it for old export files: 'mgr_' and the first
-- 32 hex digits of sha256(request_id || E'\n' || ts_ms). So a re-run of an old import still
-- finds them.
UPDATE calls SET call_id = 'mgr_' || left(encode(sha256(convert_to(
    request_id || E'\n' || ts_ms::text, 'UTF8')), 'hex'), 32);

ALTER TABLE calls ALTER COLUMN call_id SET NOT NULL;
ALTER TABLE calls DROP CONSTRAINT calls_pkey;
-- PostgreSQL requires a partitioned table's unique key to hold its partition column (ts_ms);
-- call ids are unique on their own, so this is the call id's uniqueness. New ids begin with
-- their time, so they append at the end of this index.
ALTER TABLE calls ADD PRIMARY KEY (call_id, ts_ms);
