"""A real Prometheus (Debian's package, on loopback) scrapes a running worker and relay.

With no relay running and rows committed, the lag series is still there (the worker
reports it) and grows; once a relay runs, the end-to-end latency histogram holds one
observation per handled message. The shipped rules are loaded too, so the relay-down
alert is seen going pending on real series.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from postroom import Outbox
from tests.apps.observed import Seen
from tests.conftest import ROOT
from tests.helpers import free_port, http_get, logs_of, spawn, wait_exit

RULES = ROOT / "deploy" / "prometheus" / "postroom.rules.yml"


class Prometheus:
    """A private Prometheus: own config, data directory and loopback port."""

    def __init__(self, binary: str, workdir: Path, targets: list[str]) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {
                            "job_name": "postroom-under-test",
                            "static_configs": [{"targets": targets, "labels": {"namespace": "t"}}],
                        }
                    ],
                }
            )
        )
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def _get_text(self, path: str) -> str:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def _get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())

    async def query(self, promql: str) -> list[dict[str, Any]]:
        path = "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        answer = await asyncio.to_thread(self._get, path)
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    async def value(self, promql: str) -> float | None:
        result = await self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    async def until(self, promql: str, check: Any, *, timeout: float = 30.0) -> float:
        """Poll *promql* (one series) until *check(value)* holds; return that value."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: float | None = None
        while loop.time() < deadline:
            last = await self.value(promql)
            if last is not None and check(last):
                return last
            await asyncio.sleep(0.25)
        raise AssertionError(f"{promql}: last value {last}\n{self.log_path.read_text()[-3000:]}")

    async def ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while loop.time() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            try:
                await asyncio.to_thread(self._get_text, "/-/ready")
            except OSError:
                await asyncio.sleep(0.2)
                continue
            return
            await asyncio.sleep(0.2)
        raise AssertionError(f"prometheus never ready\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "prometheus not found: run `make monitoring-tools` (apt-get install prometheus)"
        )
    return binary


async def wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while loop.time() < deadline:
        assert process.poll() is None, logs_of(process)
        try:
            status, _, _ = await http_get(port, "/readyz")
        except OSError:
            status = 0
        if status == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"never ready\n{logs_of(process)}")


async def test_lag_without_relay_and_latency_per_handled_message(
    settings, sessions, names, prometheus_binary, tmp_path
):
    consumer = f"observed.{names}"
    worker_port, relay_port = free_port(), free_port()
    common = {"POSTROOM_HEALTH_HOST": "127.0.0.1", "POSTROOM_METRICS_INTERVAL": "0.5"}
    worker = spawn(
        settings,
        "worker",
        "tests.apps.observed:router",
        POSTROOM_HEALTH_PORT=str(worker_port),
        OBSERVED_CONSUMER=consumer,
        **common,
    )
    relay: subprocess.Popen[bytes] | None = None
    prometheus = Prometheus(
        prometheus_binary, tmp_path, [f"127.0.0.1:{worker_port}", f"127.0.0.1:{relay_port}"]
    )
    try:
        await wait_ready(worker_port, worker)
        await prometheus.ready()
        box = Outbox.from_settings(settings)
        async with sessions() as session, session.begin():
            for n in range(5):
                await box.publish(session, Seen(n=n))

        # No relay runs: the worker still reports the outbox, and the lag grows.
        await prometheus.until(f'up{{instance="127.0.0.1:{relay_port}"}}', lambda v: v == 0)
        await prometheus.until(f'up{{instance="127.0.0.1:{worker_port}"}}', lambda v: v == 1)
        lag = 'max(postroom_outbox_oldest_pending_age_seconds{namespace="t"})'
        first = await prometheus.until(lag, lambda v: v > 0)
        await prometheus.until(lag, lambda v: v >= first + 2)
        assert await prometheus.value('max(postroom_outbox_pending_messages{namespace="t"})') == 5
        assert await prometheus.query('postroom_connection_up{component="relay"}') == []
        alert = 'ALERTS{alertname="PostroomRelayDown", namespace="t", alertstate="pending"}'
        await prometheus.until(alert, lambda v: v == 1)
        ready = 'postroom_ready{namespace="t", component="worker"}'
        assert await prometheus.until(ready, lambda v: v == 1) == 1

        # A relay runs: every message is handled, each one observed once, as a first attempt.
        relay = spawn(settings, "relay", POSTROOM_HEALTH_PORT=str(relay_port), **common)
        async with sessions() as session, session.begin():
            for n in range(5, 12):
                await box.publish(session, Seen(n=n))
        handled = f'sum(postroom_consumer_messages_total{{consumer="{consumer}", outcome="acked"}})'
        await prometheus.until(handled, lambda v: v == 12, timeout=60)
        count = f'postroom_delivery_latency_seconds_count{{consumer="{consumer}"'
        assert await prometheus.until(count + ', delivery="first"}', lambda v: v == 12) == 12
        assert await prometheus.value(f"sum({count}}})") == 12, "no retry or replay was made"
        p99 = (
            "histogram_quantile(0.99, sum by (le) "
            f'(postroom_delivery_latency_seconds_bucket{{consumer="{consumer}"}}))'
        )
        latency = await prometheus.value(p99)
        assert latency is not None and 0 < latency < 60, latency
        await prometheus.until(lag, lambda v: v == 0)
        await prometheus.until(
            'max(postroom_connection_up{component="relay", peer="broker", namespace="t"})',
            lambda v: v == 1,
        )
        # The alert is re-evaluated at the next rule evaluation after that scrape.
        cleared = 'absent(ALERTS{alertname="PostroomRelayDown", namespace="t"})'
        assert await prometheus.until(cleared, lambda v: v == 1) == 1, (
            "the relay-down alert clears once a relay is connected"
        )

        # The relay stops: rows committed now show as lag again, growing.
        relay.terminate()
        assert await wait_exit(relay, timeout=30) == 0, logs_of(relay)
        async with sessions() as session, session.begin():
            await box.publish(session, Seen(n=99))
        again = await prometheus.until(lag, lambda v: v > 0)
        await prometheus.until(lag, lambda v: v >= again + 2)
    finally:
        prometheus.stop()
        for process in (relay, worker):
            if process is not None and process.poll() is None:
                process.terminate()
                await wait_exit(process, timeout=30)
