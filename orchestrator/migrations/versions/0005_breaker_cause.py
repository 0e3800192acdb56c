"""Provider breakers: why the last transition happened, and which operator made it.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # ADD COLUMN takes the table's exclusive lock: behind a long transaction it would queue
    # every worker's breaker refresh and every start's probe behind it. Fail instead, to be
    # run again.
    op.execute("SET LOCAL lock_timeout = '5s'")
    # Nullable, no default: a catalogue change only. A row written before has no cause.
    # cause_version is the version the cause was written with: a writer of the previous
    # version (a rolling upgrade, a rollback) moves the version but not the cause, which
    # is then read as unknown rather than as the reason for a transition it did not make.
    op.execute(
        "ALTER TABLE provider_breakers ADD COLUMN change_cause text,"
        " ADD COLUMN changed_by text, ADD COLUMN change_reason text,"
        " ADD COLUMN cause_version bigint"
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE provider_breakers DROP COLUMN change_cause,"
        " DROP COLUMN changed_by, DROP COLUMN change_reason, DROP COLUMN cause_version"
    )
