"""lock_queues(): lock queue rows, then read them and their tasks, in one round-trip.

A handler's locking read used two statements: ``SELECT … FOR UPDATE`` on the queue rows, then
the tasks. One plain statement cannot do both: when it waits for a row lock, Postgres re-reads
the locked row at its newest version but every other table (the tasks) stays at the snapshot
taken before the wait, so the reader would see the tasks as they were before the lock
holder's commit. A PL/pgSQL function can: each statement in it takes a fresh snapshot (READ
COMMITTED), so its second statement, run once the locks are held, sees every commit made
before they were granted.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

LOCK_QUEUES = """
CREATE FUNCTION lock_queues(ids uuid[], skip_locked boolean)
RETURNS TABLE (queue order_queues, tasks order_tasks[])
-- A handler locks one queue, a timer batch a few hundred: without ROWS the planner assumes
-- 1000 rows and joins the withdrawals by scanning them all.
LANGUAGE plpgsql VOLATILE ROWS 1 AS $$
DECLARE
    locked uuid[];
BEGIN
    -- Locks in queue_id order, so two batches never wait on each other in a cycle.
    IF skip_locked THEN
        SELECT array_agg(s.queue_id) INTO locked FROM (
            SELECT q.queue_id FROM order_queues q WHERE q.queue_id = ANY(ids)
            ORDER BY q.queue_id FOR UPDATE SKIP LOCKED) s;
    ELSE
        SELECT array_agg(s.queue_id) INTO locked FROM (
            SELECT q.queue_id FROM order_queues q WHERE q.queue_id = ANY(ids)
            ORDER BY q.queue_id FOR UPDATE) s;
    END IF;
    -- A new statement, so a new snapshot: taken after the locks were granted.
    RETURN QUERY
        SELECT q, ARRAY(SELECT t FROM order_tasks t WHERE t.queue_id = q.queue_id
                        ORDER BY t.position)
        FROM order_queues q WHERE q.queue_id = ANY(locked) ORDER BY q.queue_id;
END
$$
"""


def upgrade() -> None:
    op.execute(LOCK_QUEUES)


def downgrade() -> None:
    op.execute("DROP FUNCTION lock_queues(uuid[], boolean)")
