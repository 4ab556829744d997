"""The Kubernetes manifests: valid against the Kubernetes schemas, and what the agent needs from them."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import DEPLOY, PROCESS_ENV, UNITS, setting_names, unit_sections, unit_value
from tests.deploy.test_systemd import seconds

MANIFEST = DEPLOY / "kubernetes" / "saturnos-agent.yaml"
SECRETS = {"SUPABASE_SERVICE_ROLE_KEY", "DATABASE_URL"}


def documents() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)
    return docs


def of_kind(kind: str) -> dict[str, Any]:
    [doc] = [d for d in documents() if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_document_uses_only_keys_of_its_kind(doc: dict[str, Any]) -> None:
    # strict: a key the kind's schema does not have (a typo, a misplaced field) is an error.
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_schema_check_catches_a_misplaced_key() -> None:
    daemonset = of_kind("DaemonSet")
    daemonset["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(daemonset, kubernetes_validate.latest_version(), strict=True)


def test_daemonset_on_gpu_nodes_with_probes_a_secret_and_the_shutdown_grace() -> None:
    config = of_kind("ConfigMap")["data"]
    pod = of_kind("DaemonSet")["spec"]["template"]["spec"]
    [agent] = pod["containers"]
    resources = agent["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] >= 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])

    [port] = agent["ports"]
    assert port["name"] == "metrics" and str(port["containerPort"]) == config["METRICS_PORT"]
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}

    # The key comes from the Secret, never from the ConfigMap or a literal in the pod.
    assert {"secretRef": {"name": of_kind("Secret")["metadata"]["name"]}} in agent["envFrom"]
    assert SECRETS.isdisjoint(config) and SECRETS.isdisjoint(e["name"] for e in agent.get("env", []))
    assert "SUPABASE_SERVICE_ROLE_KEY" in of_kind("Secret")["stringData"]

    # The same grace as the systemd unit, for the same shutdown.
    [stop] = unit_value(unit_sections(UNITS[0]), "Service", "TimeoutStopSec")
    assert pod["terminationGracePeriodSeconds"] == seconds(stop)
    assert config["SHUTDOWN_MODE"] == "release"

    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert agent["securityContext"]["allowPrivilegeEscalation"] is False


def test_every_variable_is_a_setting() -> None:
    names = set(of_kind("ConfigMap")["data"]) | set(of_kind("Secret")["stringData"])
    [agent] = of_kind("DaemonSet")["spec"]["template"]["spec"]["containers"]
    names |= {e["name"] for e in agent.get("env", [])}
    assert names <= setting_names() | PROCESS_ENV, sorted(names - setting_names() - PROCESS_ENV)
