"""Initial schema: withdrawals, order queues and tasks, audit, outbox, notifications.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE withdrawals (
    withdrawal_id    text PRIMARY KEY,
    merchant_id      text NOT NULL,
    amount           numeric(14, 2) NOT NULL CHECK (amount > 0),
    currency         char(3) NOT NULL,
    destination      text NOT NULL,          -- exact JSON of the request's destination
    metadata         text NOT NULL,          -- exact JSON of the request's metadata, key order kept
    cascade          jsonb NOT NULL,         -- the cascade as requested: [{provider_id, fee}]
    idempotency_key  text UNIQUE,
    request_sha256   bytea NOT NULL,
    cohort           text NOT NULL CHECK (cohort IN ('legacy', 'cascade')),
    routing_reason   text NOT NULL,
    flag_state       jsonb NOT NULL,
    trace_id         text,
    created_at       timestamptz NOT NULL
);
CREATE INDEX withdrawals_created_at ON withdrawals (created_at);
CREATE INDEX withdrawals_merchant ON withdrawals (merchant_id, created_at);

CREATE TABLE order_queues (
    queue_id          uuid PRIMARY KEY,
    withdrawal_id     text NOT NULL UNIQUE REFERENCES withdrawals (withdrawal_id),
    state             text NOT NULL CHECK (state IN ('ACTIVE', 'COMPLETED', 'FAILED', 'CANCELLED')),
    version           integer NOT NULL DEFAULT 1,
    cancel_requested  boolean NOT NULL DEFAULT false,
    cancel_reason     text,
    stop_requested    boolean NOT NULL DEFAULT false,
    failure_code      text,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    finished_at       timestamptz
);
CREATE INDEX order_queues_active ON order_queues (state) WHERE state = 'ACTIVE';

CREATE TABLE order_tasks (
    task_id             uuid PRIMARY KEY,
    queue_id            uuid NOT NULL REFERENCES order_queues (queue_id),
    position            integer NOT NULL,
    provider_id         text NOT NULL,
    fee                 numeric(14, 2) NOT NULL,
    state               text NOT NULL,
    version             integer NOT NULL DEFAULT 1,
    provider_order_id   text NOT NULL,
    provider_reference  text,
    provider_code       text,
    outcome             text,
    freeze_state        text NOT NULL DEFAULT 'none',
    cancel_requested    boolean NOT NULL DEFAULT false,
    recheck_attempts    integer NOT NULL DEFAULT 0,
    status_polls        integer NOT NULL DEFAULT 0,
    -- The one timer the task waits on and when it is due: the sweeper re-arms overdue ones.
    timer_kind          text,
    timer_attempt       integer,
    timer_due_at        timestamptz,
    state_entered_at    timestamptz NOT NULL,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    UNIQUE (queue_id, position)
);
CREATE INDEX order_tasks_timer_due ON order_tasks (timer_due_at) WHERE timer_due_at IS NOT NULL;
CREATE INDEX order_tasks_order_id ON order_tasks (provider_id, provider_order_id);
CREATE INDEX order_tasks_reference ON order_tasks (provider_id, provider_reference)
    WHERE provider_reference IS NOT NULL;
CREATE INDEX order_tasks_state ON order_tasks (state);

CREATE TABLE order_task_events (
    event_id        bigserial PRIMARY KEY,
    queue_id        uuid NOT NULL,
    task_id         uuid,
    withdrawal_id   text NOT NULL,
    from_state      text,
    to_state        text,
    event           text NOT NULL,
    actor           text NOT NULL,
    trace_id        text,
    details         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_task_events_task ON order_task_events (task_id, event_id);
CREATE INDEX order_task_events_queue ON order_task_events (queue_id, event_id);

-- Transactional outbox: written with the state change, deleted once JetStream acked it.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    subject     text NOT NULL,
    payload     bytea NOT NULL,
    headers     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE notifications (
    withdrawal_id    text NOT NULL REFERENCES withdrawals (withdrawal_id),
    status           text NOT NULL,
    body             bytea NOT NULL,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL,
    acked_at         timestamptz,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (withdrawal_id, status)
);
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE acked_at IS NULL;

CREATE TABLE unmatched_webhooks (
    id           bigserial PRIMARY KEY,
    provider_id  text NOT NULL,
    order_id     text,
    reference    text,
    status       text NOT NULL,
    reason       text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);
"""

DOWNGRADE = """
DROP TABLE unmatched_webhooks;
DROP TABLE notifications;
DROP TABLE outbox;
DROP TABLE order_task_events;
DROP TABLE order_tasks;
DROP TABLE order_queues;
DROP TABLE withdrawals;
"""


def _statements(script: str) -> list[str]:
    # asyncpg runs one statement per call.
    return [s.strip() for s in script.split(";\n") if s.strip()]


def upgrade() -> None:
    for statement in _statements(UPGRADE):
        op.execute(statement)


def downgrade() -> None:
    for statement in _statements(DOWNGRADE):
        op.execute(statement)
