"""Provider health: the fleet-wide breaker per provider, its call counts, the rate limits.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE provider_breakers (
    provider_id      text PRIMARY KEY,
    state            text NOT NULL DEFAULT 'closed'
                     CHECK (state IN ('closed', 'open', 'half_open')),
    changed_at       timestamptz NOT NULL,
    -- Open: when one probe may go (the breaker turns half-open).
    open_until       timestamptz,
    -- Half-open: the one attempt probing the provider, fleet-wide, and until when it may.
    probe_task       uuid,
    probe_until      timestamptz,
    probe_successes  integer NOT NULL DEFAULT 0,
    -- The window as it was at the last transition: what tripped (or closed) the breaker.
    failure_rate     double precision,
    calls            integer,
    version          bigint NOT NULL DEFAULT 1
);

-- Provider calls by second and result, added to by every worker: the breaker's window.
CREATE TABLE provider_calls (
    provider_id  text NOT NULL,
    second       timestamptz NOT NULL,
    ok           integer NOT NULL DEFAULT 0,
    technical    integer NOT NULL DEFAULT 0,
    PRIMARY KEY (provider_id, second)
);

-- Each rate-limited provider's theoretical arrival time (GCRA): one row, one update a start.
CREATE TABLE provider_rates (
    provider_id  text PRIMARY KEY,
    tat          timestamptz NOT NULL
)
"""

# Counting a provider's attempts in flight (max_in_flight). On a table the running version
# writes to: built CONCURRENTLY, so that the upgrade never blocks its writes.
INDEXES = """
CREATE INDEX CONCURRENTLY order_tasks_in_flight ON order_tasks (provider_id)
    WHERE state IN ('CREATING', 'RECHECKING')
"""

DOWNGRADE = """
DROP INDEX order_tasks_in_flight;
DROP TABLE provider_rates;
DROP TABLE provider_calls;
DROP TABLE provider_breakers
"""


def _statements(script: str) -> list[str]:
    # asyncpg runs one statement per call.
    return [s.strip() for s in script.split(";\n") if s.strip()]


def upgrade() -> None:
    for statement in _statements(UPGRADE):
        op.execute(statement)
    with op.get_context().autocommit_block():  # CONCURRENTLY cannot run in a transaction
        for statement in _statements(INDEXES):
            op.execute(statement)


def downgrade() -> None:
    for statement in _statements(DOWNGRADE):
        op.execute(statement)
