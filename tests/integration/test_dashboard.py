"""The Grafana dashboard (docs/grafana/chorus-dashboard.json) against real data: a real Prometheus
scrapes a real Chorus on loopback while every pool serves traffic, then every panel's query is
evaluated through Prometheus's HTTP API and must return data.

The config is the default one, changed so that every panel has something to show: a vote that
always escalates (`escalate_below: 1.0`, hot samples), and a `flaky` pool whose first expert
times out at once, so that failures and fallbacks happen."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loadtest.servers import free_port
from tests.conftest import DEFAULT_CONFIG, ROOT, ServerProcess, require_system_files

pytestmark = pytest.mark.integration

DASHBOARD = ROOT / "docs" / "grafana" / "chorus-dashboard.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
# What Grafana would put in for its variables; windows wide enough to span the whole test.
SUBSTITUTIONS = {
    "$__rate_interval": "5m",
    "$__interval": "15s",
    "$__range": "10m",
    "${pool}": ".*",
    "$pool": ".*",
}
PROMPT = "Name one colour."


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title and refId, expression with the variables substituted) of every target."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in SUBSTITUTIONS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"unsubstituted variable in {expr}"
            out.append((f"{panel['title']} [{target['refId']}]", expr))
    return out


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """Each query variable's `label_values(metric, label)` as the PromQL that lists the same."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
        assert m, f"variable {var['name']}: unexpected query {var['definition']}"
        out.append((f"variable {var['name']}", f"count by ({m[2]}) ({m[1]})"))
    return out


def dashboard_config(folder: Path) -> Path:
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for pool in config["pools"].values():
        if pool.get("router"):
            pool["router"]["artifact"] = str(DEFAULT_CONFIG.parent / pool["router"]["artifact"])
    config["pools"]["vote"]["strategy"].update(temperature=1.5, escalate_below=1.0)
    config["experts"]["smollm2-flaky"] = {
        **config["experts"]["smollm2-135m-instruct"],
        "first_token_timeout_s": 0.001,  # times out before its first token: a failure
    }
    config["pools"]["flaky"] = {
        "experts": ["smollm2-flaky", "smollm2-135m-instruct"],
        "strategy": "single",
    }
    path = folder / "dashboard.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Prometheus:
    """Debian's Prometheus on a free loopback port, scraping `target` every second."""

    def __init__(self, folder: Path, target: str) -> None:
        config = folder / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "chorus", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(folder / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("prometheus did not become ready")

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = reply.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus with two rounds of traffic to every pool scraped (two, so that rates and
    quantiles have an increase to work on)."""
    require_system_files(PROMETHEUS)
    folder = tmp_path_factory.mktemp("dashboard")
    config = dashboard_config(folder)
    server = ServerProcess(config)
    prometheus: Prometheus | None = None
    try:
        server.wait_ready(timeout_s=600)  # four models to load on a shared machine
        prometheus = Prometheus(folder, f"127.0.0.1:{server.port}")
        prometheus.wait_ready()
        pools = yaml.safe_load(config.read_text())["pools"]
        for _ in range(2):
            for i, pool in enumerate(pools):
                send(server.url, pool, stream=bool(i % 2))
            # A refused request (fuse serves n=1 only): a 4xx for the error panels.
            send(server.url, "fuse", stream=False, n=2, expect=400)
            time.sleep(3)  # at least two scrapes between the rounds
        deadline = time.monotonic() + 30
        while not prometheus.query('chorus_requests_total{pool="flaky"}'):
            assert time.monotonic() < deadline, "prometheus never scraped the traffic"
            time.sleep(0.5)
        time.sleep(2)  # the last round's counts scraped too
        yield prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()


def send(url: str, model: str, *, stream: bool, n: int = 1, expect: int = 200) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 6,
        "stream": stream,
        "n": n,
    }
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert reply.status_code == expect, reply.text


def test_every_panel_query_returns_data(scraped: Prometheus) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard) + variable_queries(dashboard)
    assert len(queries) >= 15
    empty, no_number = [], []
    for name, expr in queries:
        result = scraped.query(expr)
        values = [float(r["value"][1]) for r in result]
        if not result:
            empty.append(f"{name}: {expr}")
        elif not any(math.isfinite(v) for v in values):
            no_number.append(f"{name}: {expr} -> {values}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert not no_number, "panels with no finite value:\n" + "\n".join(no_number)


def test_a_misspelt_metric_has_no_data(scraped: Prometheus) -> None:
    # What makes the check above able to fail: a name Chorus does not export is empty.
    assert scraped.query("sum(rate(chorus_request_totall[5m]))") == []
    assert scraped.query("sum(rate(chorus_requests_total[5m]))") != []
