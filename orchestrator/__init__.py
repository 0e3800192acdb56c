"""The cascade: a durable state machine driven by JetStream, recorded in Postgres.

``domain`` is the pure state machine (tables, ``decide``, ``settle``); ``engine`` the
handlers (load → decide → effects → commit) behind the ports of ``ports``, ``core_client``
(cascade-core) and ``providers``; ``store`` every SQL query and the unit of work; ``bus`` the
JetStream streams, subjects and timers; ``outbox`` and ``deferred`` what is published after a
commit; ``worker`` the worker process (consumer, sweeper, notifier, DLQ).
"""
