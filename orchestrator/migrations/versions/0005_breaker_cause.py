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
    # Nullable, no default: a catalogue change only. A row written before has no cause.
    op.execute(
        "ALTER TABLE provider_breakers ADD COLUMN change_cause text,"
        " ADD COLUMN changed_by text, ADD COLUMN change_reason text"
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE provider_breakers DROP COLUMN change_cause,"
        " DROP COLUMN changed_by, DROP COLUMN change_reason"
    )
