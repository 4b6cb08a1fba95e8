-- Budgets shared by a fleet of replicas.

-- Each replica's reservations in flight per budget month, published at every refresh; a
-- replica admits against the others' recent rows as against its own reservations. Rows of a
-- replica that stopped publishing (killed) are ignored once stale and deleted later.
CREATE TABLE budget_reserved (
    replica TEXT NOT NULL,
    budget TEXT NOT NULL,
    month TEXT NOT NULL,
    reserved_pico BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (budget, month, replica)
);

-- Thresholds announced: the replica whose insert creates the row announces it, so each
-- threshold of a budget month is announced once for the fleet.
CREATE TABLE budget_alerts (
    budget TEXT NOT NULL,
    month TEXT NOT NULL,
    threshold TEXT NOT NULL,
    replica TEXT NOT NULL,
    fired_ms BIGINT NOT NULL,
    PRIMARY KEY (budget, month, threshold)
);
