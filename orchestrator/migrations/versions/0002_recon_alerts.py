"""Reconciliation: alerts with a lifecycle, their append-only event log, the runs.

The reconciliation job only reads the engine's tables and writes these three; the indexes
added to the engine's tables are the ones its rules query by (see orchestrator/reconciliation.py).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE recon_alerts (
    alert_id              bigserial PRIMARY KEY,
    -- Same finding, same fingerprint (rule + what it is about): a re-detection updates the
    -- alert instead of raising a second one.
    fingerprint           text NOT NULL UNIQUE,
    rule                  text NOT NULL,
    severity              text NOT NULL CHECK (severity IN ('warning', 'critical')),
    state                 text NOT NULL DEFAULT 'open'
                          CHECK (state IN ('open', 'acknowledged', 'resolved', 'accepted')),
    withdrawal_id         text,
    task_id               uuid,
    summary               text NOT NULL,
    -- What was compared, both sides' answers and when, as first detected: never updated.
    evidence              jsonb NOT NULL,
    -- The latest detection's evidence (the same shape), updated on every re-detection.
    last_evidence         jsonb NOT NULL,
    first_seen_at         timestamptz NOT NULL,
    last_seen_at          timestamptz NOT NULL,
    detections            integer NOT NULL DEFAULT 1,
    resolution_reference  text,
    acceptance_note       text,
    operator              text,
    updated_at            timestamptz NOT NULL,
    CHECK (state <> 'resolved' OR resolution_reference IS NOT NULL),
    CHECK (state <> 'accepted' OR (acceptance_note IS NOT NULL AND operator IS NOT NULL))
);
CREATE INDEX recon_alerts_state_rule ON recon_alerts (state, rule, alert_id);
CREATE INDEX recon_alerts_rule ON recon_alerts (rule, alert_id);

-- Append-only: rows are inserted, never updated or deleted.
CREATE TABLE recon_alert_events (
    event_id    bigserial PRIMARY KEY,
    alert_id    bigint NOT NULL REFERENCES recon_alerts (alert_id),
    event       text NOT NULL,
    from_state  text,
    to_state    text NOT NULL,
    actor       text NOT NULL,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX recon_alert_events_alert ON recon_alert_events (alert_id, event_id);

CREATE TABLE recon_runs (
    run_id        bigserial PRIMARY KEY,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL,
    seconds       double precision NOT NULL,
    new_alerts    integer NOT NULL,
    detections    integer NOT NULL,
    details       jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX recon_runs_finished ON recon_runs (finished_at);
"""

# The rules' queries: open freezes (stale freeze), successes by when (double success), final
# attempts by when (ledger parity), unacknowledged notifications by age, and success-after-
# final webhooks by when. On tables the running version writes to: built CONCURRENTLY, so
# that the upgrade (run while the old pods serve) never blocks their writes.
INDEXES = """
CREATE INDEX CONCURRENTLY order_tasks_frozen ON order_tasks (state_entered_at) WHERE freeze_state = 'frozen';
CREATE INDEX CONCURRENTLY order_tasks_succeeded ON order_tasks (state_entered_at, queue_id)
    WHERE state = 'SUCCEEDED';
CREATE INDEX CONCURRENTLY order_tasks_settled ON order_tasks (state_entered_at)
    WHERE freeze_state IN ('committed', 'rolled_back');
CREATE INDEX CONCURRENTLY notifications_unacked ON notifications (created_at) WHERE acked_at IS NULL;
CREATE INDEX CONCURRENTLY unmatched_webhooks_paid_after_final ON unmatched_webhooks (received_at)
    WHERE reason = 'success_after_final';
"""

DOWNGRADE = """
DROP INDEX unmatched_webhooks_paid_after_final;
DROP INDEX notifications_unacked;
DROP INDEX order_tasks_settled;
DROP INDEX order_tasks_succeeded;
DROP INDEX order_tasks_frozen;
DROP TABLE recon_runs;
DROP TABLE recon_alert_events;
DROP TABLE recon_alerts;
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
