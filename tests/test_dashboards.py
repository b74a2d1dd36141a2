"""Static checks of `dashboards/`: the alert rules pass `promtool check rules` and their unit tests, every
dashboard query is valid PromQL (checked by promtool), filters by the service's labels, and uses only
metrics the platform exports (docs/metrics.md), Ray's own verified names, or listed external exporters."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "dashboards"
DASHBOARD_FILES = sorted(DASHBOARDS.glob("*.json"))
ALERTS = DASHBOARDS / "alerts.yaml"
ALERT_TESTS = DASHBOARDS / "alerts-test.yaml"

# Ray Serve's own metrics (Ray 2.60), each seen in a scrape of `ray.init(_metrics_export_port=P)` while
# this platform served: the first three as soon as the application runs, the last after a replica was
# killed. Labels: application, deployment (`Replica` is the engine), replica where per replica.
RAY_METRICS = {
    "ray_serve_autoscaling_desired_replicas": "autoscaler's raw decision, before the min/max bounds",
    "ray_serve_autoscaling_target_replicas": "replicas Serve is reaching for (bounded)",
    "ray_serve_deployment_replica_healthy": "1 per healthy replica, 0 once stopped or failed",
    "ray_serve_health_check_failures_total": "failed health checks per replica (it is then replaced)",
}
# Exporters outside the platform that a Kubernetes cluster with GPUs usually runs.
EXTERNAL_METRICS = {
    "DCGM_FI_DEV_FB_USED": "NVIDIA DCGM exporter: GPU framebuffer used (MiB); the platform has no GPU memory metric",
    "DCGM_FI_DEV_FB_FREE": "NVIDIA DCGM exporter: GPU framebuffer free (MiB)",
    "kube_pod_container_status_restarts_total": "kube-state-metrics: container restarts of the Ray pods",
}
# Concrete values for Grafana's variables, so that a query becomes plain PromQL.
STATIC_VARIABLES = {
    "namespace": "llm", "service": "gemma", "model_name": "gemma-4",
    "__rate_interval": "1m", "__range": "1h", "gpu_plan_gib": "24",
}

_STRING = r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`'
_TOKEN = re.compile(
    rf"""(?P<string>{_STRING})
    | (?P<matchers>\{{(?:{_STRING}|[^{{}}"'`])*\}})
    | (?P<range>\[[^\]]*\])
    | (?P<variable>\$\{{?\w+\}}?)
    | (?P<number>(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)[a-zA-Z]*)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<other>\S)""",
    re.X,
)
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"')
_LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _LABEL_LIST_KEYWORDS | {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


def selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """Every vector selector of a PromQL expression: (metric name, {label: (operator, value)}).

    Skips strings, functions and aggregations, keywords, the label lists of by/without/on/ignoring/
    group_left/group_right, numbers, durations, ranges and Grafana variables. A selector without a name
    gives "".
    """
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    found: list[tuple[str, dict[str, tuple[str, str]]]] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "ident" and text.lower() in _LABEL_LIST_KEYWORDS and following == "(":
            i = tokens.index(("other", ")"), i + 1) + 1
            continue
        is_call = following == "(" or following.lower() in {"by", "without"}  # function or aggregation
        if kind == "ident" and not is_call and text.lower() not in _KEYWORDS:
            has_matchers = i + 1 < len(tokens) and tokens[i + 1][0] == "matchers"
            found.append((text, parse_matchers(following) if has_matchers else {}))
            i += 2 if has_matchers else 1
            continue
        if kind == "matchers":  # a selector by matchers only
            found.append(("", parse_matchers(text)))
        i += 1
    return found


def parse_matchers(braces: str) -> dict[str, tuple[str, str]]:
    return {name: (op, value) for name, op, value in _MATCHER.findall(braces)}


def substitute(expr: str, values: dict[str, str]) -> str:
    """The expression with Grafana's `$name` / `${name}` variables replaced (unknown names raise KeyError)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)


def load_dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included (rows themselves are not yielded)."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_queries(path: Path) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target of a dashboard."""
    for panel in panels(load_dashboard(path)):
        for target in panel["targets"]:
            yield f"{path.stem} panel {panel['id']} ({panel['title']}) target {target['refId']}", target["expr"]


def dashboard_queries(path: Path) -> Iterator[tuple[str, str]]:
    """Panel queries, and the selector inside every label_values() variable query."""
    yield from panel_queries(path)
    for var in load_dashboard(path)["templating"]["list"]:
        if var["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["definition"])
            assert inner, f"{path.stem} variable {var['name']}: expected label_values(selector, label)"
            yield f"{path.stem} variable {var['name']}", inner.group(1)


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def documented_metrics() -> set[str]:
    """Names in docs/metrics.md's table as queries see them (histograms as _bucket, _sum and _count)."""
    rows = re.findall(r"^\| `([a-z_:0-9]+)` \| (\w+) \|", (REPO / "docs" / "metrics.md").read_text(), flags=re.M)
    assert len(rows) >= 20
    names = set()
    for name, kind in rows:
        names |= {name + suffix for suffix in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
    return names


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: run `bash scripts/install-system-deps` (Debian package prometheus)")
    return subprocess.run([binary, *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def all_queries() -> list[tuple[str, str]]:
    queries = [(where, expr) for path in DASHBOARD_FILES for where, expr in dashboard_queries(path)]
    return queries + [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]


# ---------------------------------------------------------------------------- alert rules
def test_promtool_checks_the_alert_rules() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    result = promtool("test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_for_severity_annotations_and_a_firing_unit_test() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {
        "Gemma4TimeToFirstTokenHigh", "Gemma4HighErrorRatio", "Gemma4KVCacheSaturated",
        "Gemma4ReplicasAtMaximum", "Gemma4ReplicaRestarted",
    }
    cases = [case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: no `for`"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name
        assert any(c["alertname"] == name and c.get("exp_alerts") for c in cases), f"{name} never fires in a unit test"
    assert any(not c.get("exp_alerts") for c in cases), "no unit test checks that an alert stays quiet"


# ---------------------------------------------------------------------------- dashboards
def test_dashboards_are_grafana_dashboards_with_the_service_variables() -> None:
    assert {p.stem for p in DASHBOARD_FILES} == {"overview", "capacity", "moe", "thinking-tools"}
    uids = set()
    for path in DASHBOARD_FILES:
        dashboard = load_dashboard(path)
        assert dashboard["schemaVersion"] >= 36 and dashboard["title"] and dashboard["uid"] not in uids, path.name
        uids.add(dashboard["uid"])
        variables = {var["name"]: var for var in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        for name in ("namespace", "service", "model_name"):
            assert variables[name]["type"] == "query", f"{path.name}: variable {name}"
            assert variables[name]["datasource"]["uid"] == "${datasource}", f"{path.name}: variable {name}"
        ids = [panel["id"] for panel in dashboard["panels"]]
        ids += [panel["id"] for row in dashboard["panels"] for panel in row.get("panels", [])]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in panels(dashboard):
            where = f"{path.name}: {panel['title']}"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["description"] and panel["targets"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}, where
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), where
            assert all(target["datasource"]["uid"] == "${datasource}" for target in panel["targets"]), where


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    rules = []
    for i, (where, expr) in enumerate(all_queries()):
        rules.append({"record": f"query_{i}", "expr": substitute(expr, STATIC_VARIABLES), "labels": {"where": where}})
    rules_file = tmp_path / "queries.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}))
    result = promtool("check", "rules", rules_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_queries_use_only_exported_metrics() -> None:
    allowed = documented_metrics() | set(RAY_METRICS) | set(EXTERNAL_METRICS)
    used: set[str] = set()
    for where, expr in all_queries():
        names = {name for name, _ in selectors(expr)}
        assert names <= allowed, f"{where}: {sorted(names - allowed)} is neither documented, Ray's, nor listed external"
        used |= names
    assert not (set(RAY_METRICS) | set(EXTERNAL_METRICS)) - used, "listed metrics no query uses"


def test_dashboard_selectors_filter_by_namespace_service_and_model() -> None:
    """Each selector picks the chosen service's series (external exporters: only the namespace)."""
    for path in DASHBOARD_FILES:
        for where, expr in panel_queries(path):
            for name, matchers in selectors(expr):
                assert matchers.get("namespace") == ("=", "$namespace"), f"{where}: {name}"
                if name in EXTERNAL_METRICS:
                    continue
                assert matchers.get("service") == ("=", "$service"), f"{where}: {name}"
                if name not in RAY_METRICS:
                    assert matchers.get("model_name") == ("=~", "$model_name"), f"{where}: {name}"


def test_selector_parser_skips_functions_keywords_and_label_lists() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, job) '
        '(rate(vllm:time_to_first_token_seconds_bucket{a="x}", b=~"5..|y"}[5m])))'
        ' / on (job) group_left(instance) max without (replica) (up offset 1h) > bool 1e3 * $scale'
        ' and label_replace(foo_total, "dst", "$1", "src", "(.*)") unless {__name__="bar"}'
    )
    assert selectors(expr) == [
        ("vllm:time_to_first_token_seconds_bucket", {"a": ("=", "x}"), "b": ("=~", "5..|y")}),
        ("up", {}),
        ("foo_total", {}),
        ("", {"__name__": ("=", "bar")}),
    ]


def test_readme_describes_every_dashboard_and_alert() -> None:
    readme = (DASHBOARDS / "README.md").read_text()
    for path in DASHBOARD_FILES:
        assert f"`{path.name}`" in readme and load_dashboard(path)["title"] in readme, path.name
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in readme, rule["alert"]
    for name in EXTERNAL_METRICS:
        assert name in readme, name
