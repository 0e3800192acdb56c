"""Prometheus metrics. The names and labels of DESIGN.md are a fixed interface.

``cohort`` is ``legacy`` or ``cascade`` on every withdrawal-level series. When several
processes share one host (``make run``), ``PROMETHEUS_MULTIPROC_DIR`` makes the gateway's
``/metrics`` show the workers' series too.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# ``withdrawals_total`` reserves the name ``withdrawals_created`` (its creation timestamp),
# which collides with the fixed name ``withdrawals_created_total``. No ``_created`` series are
# exported, and the one counter lives in its own registry that /metrics appends.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
SECOND_REGISTRY = CollectorRegistry(auto_describe=True)

withdrawals_created = Counter(
    "withdrawals_created",
    "Withdrawals accepted, by cohort.",
    ["cohort"],
    registry=SECOND_REGISTRY,
)
withdrawals_final = Counter(
    "withdrawals", "Withdrawals that reached a final status.", ["cohort", "outcome"]
)
withdrawals_returned = Counter(
    "withdrawals_returned",
    "Withdrawals whose paid attempt the provider reported returned (SUCCEEDED -> RETURNED),"
    " by cohort: the public status stays succeeded; subtract these for the net success rate.",
    ["cohort"],
)
withdrawal_attempts = Histogram(
    "withdrawal_attempts",
    "Provider attempts per final withdrawal.",
    ["cohort"],
    buckets=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 32),
)
withdrawal_duration = Histogram(
    "withdrawal_duration_seconds",
    "Time from creation to final status.",
    ["cohort", "outcome"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400),
)
task_time_in_state = Histogram(
    "task_time_in_state_seconds",
    "Time a task spent in a state before leaving it.",
    ["state", "provider"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 21600),
)
dlq_size = Gauge("dlq_size", "Messages waiting in the dead-letter stream.", multiprocess_mode="max")
tasks_in_state = Gauge(
    "tasks_in_state",
    "Tasks currently in each non-final state (from Postgres).",
    ["state"],
    multiprocess_mode="max",
)
task_oldest_in_state = Gauge(
    "task_oldest_in_state_seconds",
    "Age of the oldest task in each non-final state: a stuck task shows here before it moves.",
    ["state"],
    multiprocess_mode="max",
)
core_notifications = Counter(
    "core_notifications", "Final-status notifications sent to cascade-core.", ["result"]
)
routing_decisions = Counter(
    "routing_decisions", "Cohort decisions for new withdrawals.", ["cohort", "reason"]
)
webhooks = Counter("webhooks", "Provider webhooks received, by outcome.", ["provider", "result"])
withdrawals_unknown_provider = Counter(
    "withdrawals_unknown_provider",
    "Cascade attempts skipped because their provider is not in the providers file (no label:"
    " the provider ids come from requests; the log line names each).",
)
webhooks_unmatched = Counter(
    "webhooks_unmatched",
    "Verified webhooks no live task took, by reason (unknown_order, task_final, and"
    " success_after_final: a payout reported for an attempt that ended without one).",
    ["provider", "reason"],
)
handler_errors = Counter(
    "orchestrator_handler_errors",
    "Handler attempts that failed and will be retried.",
    ["subject", "error"],
)
broker_heals = Counter(
    "broker_heals",
    "Times this process found the broker without its streams or work consumer (a store lost)"
    " and recreated them.",
)
recon_alerts_open = Gauge(
    "recon_alerts_open",
    "Reconciliation alerts neither resolved nor accepted (open or acknowledged), per rule.",
    ["rule"],
    multiprocess_mode="max",
)
recon_run_seconds = Histogram(
    "recon_run_seconds",
    "How long a reconciliation run took.",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
recon_last_success = Gauge(
    "recon_last_success_timestamp",
    "Unix time the last reconciliation run of this process finished (the fleet's runner"
    " takes turns: take the max across processes).",
    multiprocess_mode="max",
)
recon_rows_capped = Counter(
    "recon_rows_capped",
    "Reconciliation runs in which a rule's query returned as many rows as it may read: that"
    " rule's findings were partial (the log line names the rule and the cap).",
    ["rule"],
)

# Provider health (README, *Provider health*).
provider_breaker_state = Gauge(
    "provider_breaker_state",
    "Each provider's fleet-wide breaker: 0 closed, 1 half-open, 2 open.",
    ["provider"],
    multiprocess_mode="max",
)
provider_attempts = Counter(
    "provider_attempts",
    "Provider calls by result: ok, declined (a business refusal), technical (no usable answer).",
    ["provider", "result"],
)
provider_limit_waits = Counter(
    "provider_limit_waits",
    "Starts that waited for a provider's rate limit (rate) or in-flight limit (in_flight).",
    ["provider", "kind"],
)
provider_passed_over = Counter(
    "provider_passed_over",
    "Attempts passed over, or held, because their provider's breaker was open.",
    ["provider"],
)
provider_retries = Counter(
    "provider_retries",
    "Creates declined with a code the error table retries (the code), each one to be made"
    " again at the same provider after its backoff.",
    ["provider", "code"],
)
