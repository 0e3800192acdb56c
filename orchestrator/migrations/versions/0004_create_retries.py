"""Same-provider retries: how many times a task's declined create was made again.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant default: Postgres records it in the catalogue, no table rewrite, so the
    # upgrade takes its lock for an instant only while the running version writes tasks.
    op.execute("ALTER TABLE order_tasks ADD COLUMN create_retries integer NOT NULL DEFAULT 0")


def downgrade() -> None:
    op.execute("ALTER TABLE order_tasks DROP COLUMN create_retries")
