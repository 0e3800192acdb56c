"""Smoke test of the peer benchmark's flows (bench/peers/): they import and their definitions
are valid. Nothing here starts a server; ``make bench-peers`` runs them for real. Skipped when
the ``peers`` dependency group is not installed, as under ``make test``."""

from __future__ import annotations

import pytest

NOT_INSTALLED = "the peers dependency group is not installed (make bench-peers installs it)"
pytest.importorskip("temporalio", reason=NOT_INSTALLED)
pytest.importorskip("dbos", reason=NOT_INSTALLED)

# Imported only once the group is known to be there (hence below the skips).
from dbos._dbos import _get_or_create_dbos_registry  # noqa: E402
from temporalio import activity, workflow  # noqa: E402
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner  # noqa: E402

from bench.peers import dbos_app  # noqa: E402
from bench.peers.temporal_app import Activities  # noqa: E402
from bench.peers.temporal_workflow import WithdrawalWorkflow  # noqa: E402

STEPS = ("freeze", "create", "status", "commit", "rollback", "notify")


async def test_the_temporal_workflow_is_a_valid_definition_the_sandbox_accepts() -> None:
    definition = workflow._Definition.must_from_class(WithdrawalWorkflow)
    assert definition.name == "WithdrawalWorkflow"
    assert set(definition.signals) == {"provider_webhook"}
    # What a worker does when it starts: import the workflow's module inside the sandbox.
    SandboxedWorkflowRunner().prepare_workflow(definition)


def test_the_temporal_activities_are_the_steps_the_workflow_calls() -> None:
    names = {activity._Definition.must_from_callable(getattr(Activities, n)).name for n in STEPS}
    assert names == set(STEPS)


def test_the_dbos_flow_registers_one_workflow_and_its_steps() -> None:
    # DBOS has no public registry listing: its module-level one is what DBOS.launch() reads.
    registered = set(_get_or_create_dbos_registry().workflow_info_map)
    assert "withdrawal_workflow" in registered
    # A step is registered as the one-step workflow DBOS runs when it is called on its own.
    for step in ("freeze", "create", "order_status", "commit", "rollback", "notify"):
        assert f"<temp>.{step}" in registered
    assert dbos_app.withdrawal_workflow.__name__ == "withdrawal_workflow"
