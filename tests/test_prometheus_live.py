"""The dashboards against live data: the platform on Ray Serve (tiny MoE model, CPU) under steady traffic,
scraped every second by a real Prometheus server (Debian's `prometheus`), which must answer each
dashboard's main queries with data and evaluate the alert rules without errors."""

from __future__ import annotations

import math
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from gemma4_platform.api.v1 import serving_pb2 as pb
from gemma4_platform.api.v1 import serving_pb2_grpc as pb_grpc
from gemma4_platform.settings import PlatformSettings
from platform_fixtures import TINY_MOE_SETTINGS, ServedPlatform, free_port, served_platform, wait_until
from test_dashboards import ALERTS, DASHBOARDS, EXTERNAL_METRICS, all_queries, load_dashboard, panels, selectors, substitute

# With n-gram speculation, so the speculative-decoding panels' series (per draft position too) exist.
SETTINGS = {**TINY_MOE_SETTINGS, "engine": {**TINY_MOE_SETTINGS["engine"], "speculative": {"model": "ngram"}}}
NAMESPACE, SERVICE = "gemma4-test", "tiny-moe-svc"  # the labels a ServiceMonitor would add
VARIABLES = {
    "namespace": NAMESPACE, "service": SERVICE, "model_name": TINY_MOE_SETTINGS["model"]["name"],
    "__rate_interval": "30s", "__range": "5m",
}
# The panels each dashboard is for; every query of each must return finite values.
MAIN_PANELS = {
    "overview.json": ["Requests by status", "Time to first token", "Tokens per second"],
    "capacity.json": [
        "KV-cache usage per cache group", "Waiting and running requests", "Prefix cache hit rate",
        "Replicas: desired, target, healthy",
    ],
    "moe.json": [
        "Hottest experts over time (tokens/s)", "Hottest experts' share of their layer (time range)",
        "Expert load per layer (recent imbalance)", "Expert imbalance per layer",
    ],
    "thinking-tools.json": ["Reasoning-token share", "Tool calls", "Chat requests"],
}


def send_traffic(platform: ServedPlatform, stop: threading.Event, errors: list[BaseException]) -> None:
    """gRPC Generate and Chat, and OpenAI chat completions, until `stop` is set (or one fails: in `errors`)."""
    try:
        _send_until(platform, stop)
    except Exception as exc:  # noqa: BLE001 - reported by the fixture
        errors.append(exc)


def _send_until(platform: ServedPlatform, stop: threading.Event) -> None:
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    generate = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, 105, 30, 31]), sampling=sampling)
    chat = pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="Hi")])], sampling=sampling)
    completion = {"model": VARIABLES["model_name"], "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    with (
        grpc.insecure_channel(platform.grpc_target) as channel,
        httpx.Client(base_url=platform.http, timeout=60) as http,
    ):
        stub = pb_grpc.Gemma4ServingStub(channel)
        while not stop.is_set():
            stub.Generate(generate, timeout=60)
            stub.Chat(chat, timeout=60)
            http.post("/v1/chat/completions", json=completion).raise_for_status()


def prometheus_config(http: str, ray_metrics: str) -> dict[str, Any]:
    labels = {"namespace": NAMESPACE, "service": SERVICE}
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "gemma4-gateway", "metrics_path": "/metrics",
             "static_configs": [{"targets": [http.split("/")[2]], "labels": labels}]},
            {"job_name": "ray", "metrics_path": "/metrics",
             "static_configs": [{"targets": [ray_metrics.split("/")[2]], "labels": labels}]},
        ],
    }


@dataclass
class Live:
    """A Prometheus server scraping the served platform, and any error of the traffic sender."""

    url: str
    traffic_errors: list[BaseException]

    def finite_result(self, promql: str) -> list[dict[str, Any]]:
        """The query's series when there is at least one and every value is a number (empty otherwise)."""
        assert not self.traffic_errors, f"traffic failed: {self.traffic_errors[0]!r}"
        result = query(self.url, promql)
        return result if result and all(math.isfinite(float(s["value"][1])) for s in result) else []


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Prometheus scraping the served platform every second while traffic flows."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run `bash scripts/install-system-deps` (Debian package prometheus)")
    workdir = tmp_path_factory.mktemp("prometheus")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    try:
        with served_platform(SETTINGS, ray_metrics_port=free_port()) as platform:
            assert platform.ray_metrics is not None
            config = workdir / "prometheus.yml"
            config.write_text(yaml.safe_dump(prometheus_config(platform.http, platform.ray_metrics)))
            yield from scrape_under_traffic(binary, config, workdir, platform)
    finally:
        monkeypatch.undo()


def scrape_under_traffic(binary: str, config: Path, workdir: Path, platform: ServedPlatform) -> Iterator[Live]:
    """Run Prometheus (stopped by its PID at the end) and the traffic sender around one yield."""
    live = Live(f"http://127.0.0.1:{free_port()}", [])
    log_path = workdir / "prometheus.log"
    stop = threading.Event()
    traffic = threading.Thread(target=send_traffic, args=(platform, stop, live.traffic_errors), daemon=True)
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={live.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: ready(live.url, server, log_path), 20, what="Prometheus to start")
            wait_until(lambda: len(query(live.url, "up == 1")) == 2, 20, what="both targets scraped")
            traffic.start()
            yield live
        finally:
            stop.set()
            if traffic.is_alive():
                traffic.join(timeout=60)
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def ready(url: str, server: subprocess.Popen[bytes], log: Path) -> bool:
    assert server.poll() is None, f"Prometheus exited with {server.returncode}: {log.read_text()[-2000:]}"
    try:
        return httpx.get(url + "/-/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def query(url: str, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(url + "/api/v1/query", params={"query": promql}, timeout=10).json()
    assert response["status"] == "success", f"{promql}: {response}"
    return response["data"]["result"]


@pytest.mark.parametrize("dashboard", sorted(MAIN_PANELS))
def test_main_queries_of_each_dashboard_return_data(prometheus: Live, dashboard: str) -> None:
    by_title = {panel["title"]: panel for panel in panels(load_dashboard(DASHBOARDS / dashboard))}
    for title in MAIN_PANELS[dashboard]:
        for target in by_title[title]["targets"]:
            promql = substitute(target["expr"], VARIABLES)
            wait_until(lambda q=promql: prometheus.finite_result(q), 30, interval=0.5,
                       what=f"{dashboard} '{title}' {target['refId']} to return data: {promql}")


def test_series_carry_cache_groups_and_experts(prometheus: Live) -> None:
    by_title = {panel["title"]: panel for panel in panels(load_dashboard(DASHBOARDS / "capacity.json"))}
    promql = substitute(by_title["KV-cache usage per cache group"]["targets"][0]["expr"], VARIABLES)
    result = wait_until(lambda: prometheus.finite_result(promql), 30, what="KV usage per cache group")
    assert {series["metric"]["group"] for series in result} == {"sliding", "full"}
    assert all(0 <= float(series["value"][1]) <= 1 for series in result)
    # Bounded expert series: one per MoE layer, and at most the top N (layer, expert) pairs per replica.
    hot = query(prometheus.url, f'count(gemma4_moe_hot_expert_tokens{{namespace="{NAMESPACE}"}})')
    assert 1 < float(hot[0]["value"][1]) <= PlatformSettings().telemetry.moe_top_experts
    layers = query(prometheus.url, f'count(gemma4_moe_layer_tokens{{namespace="{NAMESPACE}"}})')
    assert float(layers[0]["value"][1]) >= 1


def test_alert_rules_evaluate_on_the_live_series(prometheus: Live) -> None:
    expected = {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}

    def evaluated() -> list[dict[str, Any]] | None:
        response = httpx.get(prometheus.url + "/api/v1/rules", timeout=10).json()
        rules = [rule for group in response["data"]["groups"] for rule in group["rules"]]
        done = {rule["name"] for rule in rules if not rule["lastEvaluation"].startswith("0001")} == expected
        return rules if done else None

    rules = wait_until(evaluated, 20, what="every alert rule evaluated")
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]


def test_every_metric_the_dashboards_use_is_in_the_live_scrape(prometheus: Live) -> None:
    """Checked against what Prometheus really scraped from the running platform (gateway and Ray)."""
    only_after_a_failure = {"ray_serve_health_check_failures_total"}
    used = {name for _, expr in all_queries() for name, _ in selectors(expr)}
    wanted = used - set(EXTERNAL_METRICS) - only_after_a_failure

    def scraped() -> set[str]:
        names = httpx.get(prometheus.url + "/api/v1/label/__name__/values", timeout=10).json()["data"]
        return set(names)

    wait_until(lambda: wanted <= scraped(), 30, what=f"live series for {sorted(wanted - scraped())}")
