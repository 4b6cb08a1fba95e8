-- Budget alerts waiting for their webhook, shared by the fleet: whichever replica is up
-- delivers them, one attempt at a time. A row is claimed under a lease (lease_owner,
-- lease_until_ms); while a lease runs no other attempt starts, and a replica that dies
-- mid-attempt holds the endpoint only until its lease ends. The id is the alert's
-- Idempotency-Key; the body is sent exactly as stored.
CREATE TABLE webhook_outbox (
    id TEXT PRIMARY KEY,
    created_ms BIGINT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT NOT NULL,
    lease_owner TEXT,
    lease_until_ms BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX webhook_outbox_next ON webhook_outbox (next_attempt_ms);
