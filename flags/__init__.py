"""Cohort routing: the ``withdrawals.cascade`` Unleash toggle decides legacy or cascade."""

from flags.router import (
    TOGGLE,
    Cohort,
    CohortRouter,
    FlagsError,
    Reason,
    RoutingDecision,
    Source,
    load_flags_file,
)

__all__ = [
    "TOGGLE",
    "Cohort",
    "CohortRouter",
    "FlagsError",
    "Reason",
    "RoutingDecision",
    "Source",
    "load_flags_file",
]
