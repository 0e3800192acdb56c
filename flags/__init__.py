"""Cohort routing: the ``withdrawals.cascade`` Unleash toggle decides legacy or cascade for
each new withdrawal (``router``: live Unleash, the offline ``FLAGS_FILE``, fail-safe legacy)."""
