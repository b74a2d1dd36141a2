"""The Helm chart, rendered by real Helm (helm-python-sdk): lint, schema, strict manifest validation,
security posture, RBAC, and that its copies of the CRD, dashboards and alerts are current."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python import Chart, HelmError, HelmValuesError, lint

from gemma4_operator.crd import crd_manifest
from gemma4_operator.manifests import desired_objects

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "gemma4-platform"
KUBE_VERSIONS = ("1.31.0", "1.33.0")
PRESETS = ("values-gke.yaml", "values-eks.yaml", "values-amd.yaml")
EVERYTHING_ON = {
    "example": {"enabled": True, "metricsTokenSecretName": "gemma4-scrape-token"},
    "operator": {"replicas": 2},
    "monitoring": {"serviceMonitor": {"enabled": True, "metricsTokenSecretName": "gemma4-scrape-token"},
                   "podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
}
# Custom resources the chart renders, and the schemas they are checked against instead.
CUSTOM_KINDS = {"Gemma4Service", "ServiceMonitor", "PodMonitor", "PrometheusRule", "ClusterKopfPeering", "KopfPeering"}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name="g4", namespace="serving", is_install=True)
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def preset(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / name).read_text()) or {}


VALUE_SETS = {"default": {}, "everything": EVERYTHING_ON} | {p: deep_merge(preset(p), EVERYTHING_ON) for p in PRESETS}


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_renders_and_every_builtin_manifest_validates_strictly(name: str) -> None:
    docs = render(VALUE_SETS[name])
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap"} <= kinds
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_custom_resources_validate_against_their_schemas() -> None:
    docs = render(EVERYTHING_ON)
    crd_schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    monitoring = yaml.safe_load((REPO / "tests" / "data" / "prometheus-operator-subset.schema.yaml").read_text())
    seen = set()
    for doc in docs:
        kind = doc["kind"]
        if kind == "Gemma4Service":
            jsonschema.Draft4Validator(crd_schema).validate(doc)  # OpenAPI v3.0 schemas are draft-4 style
        elif kind in monitoring:
            jsonschema.validate(doc, monitoring[kind])
        elif kind == "ClusterKopfPeering":
            assert doc["apiVersion"] == "kopf.dev/v1" and set(doc) == {"apiVersion", "kind", "metadata"}
        seen.add(kind)
    assert CUSTOM_KINDS - {"KopfPeering"} <= seen


def example(values: dict[str, Any]) -> dict[str, Any]:
    return next(d for d in render({"example": {"enabled": True, **values}}) if d["kind"] == "Gemma4Service")


def test_example_authenticates_by_default_and_serves_anyone_only_when_asked() -> None:
    assert example({})["spec"]["gateway"] == {"apiKeySecretName": "gemma4-api-keys", "allowUnauthenticated": False}
    assert "monitoring" not in example({})["spec"]
    assert example({"apiKeySecretName": "", "allowUnauthenticated": True})["spec"]["gateway"] == {"allowUnauthenticated": True}
    with pytest.raises(HelmError, match="set example.apiKeySecretName"):
        example({"apiKeySecretName": ""})
    monitor = next(d for d in render(EVERYTHING_ON) if d["kind"] == "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["authorization"] == {
        "type": "Bearer", "credentials": {"name": "gemma4-scrape-token", "key": "token"}}
    assert example(EVERYTHING_ON["example"])["spec"]["monitoring"] == {"metricsTokenSecretName": "gemma4-scrape-token"}


def test_example_speculative_decoding_reaches_the_gemma4service() -> None:
    from gemma4_operator.spec import Gemma4ServiceSpec

    assert "speculative" not in example({})["spec"]
    drafter = {"uri": "hf://google/gemma-4-E4B-it-assistant"}
    spec = example({"speculative": {"method": "assistant", "numTokens": 3, "assistant": drafter}})["spec"]
    assert spec["speculative"] == {"method": "assistant", "numTokens": 3, "assistant": drafter}
    assert Gemma4ServiceSpec.model_validate(spec).speculative.assistant.uri == drafter["uri"]
    assert example({"speculative": {"method": "ngram"}})["spec"]["speculative"] == {"method": "ngram"}
    with pytest.raises(HelmError, match="method assistant needs example.speculative.assistant"):
        example({"speculative": {"method": "assistant"}})


def test_peering_follows_the_watched_namespaces() -> None:
    docs = render({"operator": {"replicas": 2, "watchNamespaces": ["a", "b"]}})
    peerings = [d for d in docs if d["kind"] in ("KopfPeering", "ClusterKopfPeering")]
    assert [(d["kind"], d["metadata"]["namespace"]) for d in peerings] == [("KopfPeering", "a"), ("KopfPeering", "b")]
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=a" in args and "--namespace=b" in args and any(a.startswith("--peering=") for a in args)
    assert not [d for d in render({}) if "Peering" in d["kind"]]  # one replica: standalone


def test_lint_strict_and_presets_pass_the_schema() -> None:
    result = lint(str(CHART), strict=True, kube_version="v1.33.0")
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] > 1] == []  # nothing above INFO
    with Chart.load(CHART) as chart:
        for name in PRESETS:
            chart.validate_schema(preset(name))


@pytest.mark.parametrize(
    "values,message",
    [
        ({"cloud": "azure"}, "at '/cloud': value must be one of 'generic', 'gke', 'eks'"),
        ({"operator": {"replicas": 0}}, "at '/operator/replicas': minimum: got 0, want 1"),
        ({"operator": {"image": {"repository": ""}}}, "at '/operator/image/repository'"),
        ({"example": {"variant": "70b"}}, "at '/example/variant': value must be one of"),
        ({"example": {"accelerator": "tpu-v4"}}, "at '/example/accelerator'"),
        ({"example": {"checkpoint": {"uri": "ftp://x"}}}, "at '/example/checkpoint/uri'"),
        ({"monitoring": {"serviceMonitor": {"interval": "soon"}}}, "at '/monitoring/serviceMonitor/interval'"),
        ({"example": {"apiKeySecretName": "Keys_1"}}, "at '/example/apiKeySecretName'"),
        ({"example": {"allowUnauthenticated": "yes"}}, "at '/example/allowUnauthenticated'"),
        ({"unknownKey": 1}, "additional properties 'unknownKey' not allowed"),
        ({"example": {"speculative": {"method": "eagle"}}}, "at '/example/speculative/method'"),
        ({"example": {"speculative": {"numTokens": 0}}}, "at '/example/speculative/numTokens'"),
    ],
)
def test_schema_rejects_bad_values_with_clear_messages(values: dict[str, Any], message: str) -> None:
    with Chart.load(CHART) as chart, pytest.raises(HelmValuesError, match=re.escape(message)):
        chart.validate_schema(values)


def test_pods_run_as_non_root_with_read_only_root_filesystem() -> None:
    for doc in render(EVERYTHING_ON):
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert "livenessProbe" in container and "readinessProbe" in container and "resources" in container


def test_rbac_has_no_wildcard_and_covers_what_the_operator_writes() -> None:
    role = next(d for d in render({}) if d["kind"] == "ClusterRole")
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
    granted = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    plurals = {"RayService": "rayservices", "Service": "services", "PodDisruptionBudget": "poddisruptionbudgets",
               "NetworkPolicy": "networkpolicies", "ServiceMonitor": "servicemonitors"}
    for obj in desired_objects_sample():
        group = obj["apiVersion"].rpartition("/")[0]
        assert {"get", "create", "patch"} <= granted[(group, plurals[obj["kind"]])], obj["kind"]
    assert {"patch"} <= granted[("serving.gemma4.dev", "gemma4services/status")]


def desired_objects_sample() -> list[dict[str, Any]]:
    """Everything the operator creates for one feasible Gemma4Service (with a ServiceMonitor)."""
    from gemma4.memory import ServingSpec, plan
    from gemma4_operator.manifests import Owner
    from gemma4_operator.spec import Gemma4ServiceSpec

    spec = Gemma4ServiceSpec.model_validate(
        {"model": {"variant": "e4b", "checkpoint": {"uri": "hf://google/gemma-4-E4B-it"}}, "accelerator": {"type": "l4"},
         "gateway": {"apiKeySecretName": "g-keys"}}
    )
    planned = plan(ServingSpec(variant="e4b", accelerator="l4", max_model_len=8192, max_num_seqs=16))
    owner = Owner(name="g", namespace="serving", uid="1234")
    return desired_objects(owner, spec, planned, with_service_monitor=True)


def test_chart_copies_are_current() -> None:
    assert yaml.safe_load((CHART / "crds" / "gemma4services.yaml").read_text()) == crd_manifest()
    for source in (REPO / "dashboards").glob("*.json"):
        assert (CHART / "files" / "dashboards" / source.name).read_text() == source.read_text(), source.name
    assert {p.name for p in (CHART / "files" / "dashboards").glob("*.json")} == {
        p.name for p in (REPO / "dashboards").glob("*.json")
    }
    assert (CHART / "files" / "alerts" / "alerts.yaml").read_text() == (REPO / "dashboards" / "alerts.yaml").read_text()


def test_container_recipes_copy_real_paths_and_call_real_entry_points() -> None:
    scripts = yaml.safe_load(_toml_scripts())
    for dockerfile in (REPO / "deploy" / "docker").glob("*.Dockerfile"):
        text = dockerfile.read_text()
        for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
            parts = [p for p in line.split() if not p.startswith("--")]
            for source in parts[:-1]:
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
        for match in re.findall(r'^(?:CMD|ENTRYPOINT) \["([^"]+)"', text, flags=re.M):
            assert match in scripts, f"{dockerfile.name}: {match} is not a console script of the project"
        assert re.search(r'\.\[(platform|operator)\]', text), dockerfile.name
    operator = (REPO / "deploy" / "docker" / "operator.Dockerfile").read_text()
    assert not re.search(r"pip install[^\n]*torch", operator)  # the slim image has no torch
    with Chart.load(CHART) as chart:
        repository = chart.values["operator"]["image"]["repository"]
    assert repository.endswith("/gemma4-operator")


def _toml_scripts() -> str:
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return yaml.safe_dump(data["project"]["scripts"])
