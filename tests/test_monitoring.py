"""Alert rules and dashboard: generated files match their source, promtool accepts and
unit-tests every alert, runbook links land on a section, every dashboard query parses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from postroom import alerts, dashboard
from postroom.cli import app
from tests.conftest import ROOT

RULES = ROOT / "deploy" / "prometheus" / "postroom.rules.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "prometheus" / "postroom-prometheusrule.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "postroom-dashboard.json"
UNIT_TESTS = ROOT / "tests" / "promtool" / "alerts.test.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
REGENERATE = (
    "regenerate with `postroom monitoring rules -o deploy/prometheus/postroom.rules.yml`, "
    "`... --format kubernetes -o deploy/prometheus/postroom-prometheusrule.yaml` and "
    "`postroom monitoring dashboard -o deploy/grafana/postroom-dashboard.json`"
)


@pytest.fixture(scope="session")
def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: run `make monitoring-tools` (apt-get install prometheus)")
    return exe


def run_promtool(promtool: str, *args: str | Path) -> str:
    done = subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_committed_files_are_the_generators_output():
    assert RULES.read_text() == alerts.prometheus_rules(), REGENERATE
    assert PROMETHEUS_RULE.read_text() == alerts.prometheus_rule(), REGENERATE
    assert DASHBOARD.read_text() == dashboard.dumps(), REGENERATE


def test_rules_file_and_prometheusrule_hold_the_same_rules(promtool, tmp_path):
    plain = yaml.safe_load(RULES.read_text())
    kube = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert kube["apiVersion"] == "monitoring.coreos.com/v1"
    assert kube["kind"] == "PrometheusRule"
    assert kube["spec"] == plain == {"groups": alerts.rule_groups()}
    unwrapped = tmp_path / "from-prometheusrule.yml"
    unwrapped.write_text(yaml.safe_dump(kube["spec"]))
    for path in (RULES, unwrapped):
        assert "SUCCESS: 12 rules found" in run_promtool(promtool, "check", "rules", path)


def test_every_alert_has_what_a_page_needs():
    anchors = _anchors(OPERATIONS.read_text())
    names = {a.name for a in alerts.alerts(alerts.Thresholds())}
    assert names == {
        "PostroomOutboxLagHigh",
        "PostroomRelayDown",
        "PostroomDeadLettersGrowing",
        "PostroomConsumerStalled",
        "PostroomWorkerNotReady",
        "PostroomRetriesSpiking",
        "PostroomUnroutableRows",
        "PostroomDeliveryLatencyHigh",
    }
    for rule in _alert_rules(yaml.safe_load(RULES.read_text())):
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        page, anchor = notes["runbook_url"].split("#")
        assert page == "docs/operations.md"
        assert anchor in anchors, f"{rule['alert']}: docs/operations.md has no #{anchor}"
        assert "job" not in rule["expr"], "rules must not depend on how targets are named"


def test_promtool_unit_tests_cover_every_alert_firing_and_quiet(promtool):
    """Each alert has a case where it fires and one where the look-alike stays quiet."""
    cases = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {a.name for a in alerts.alerts(alerts.Thresholds())}
    assert fired == names, f"alerts never shown firing: {names - fired}"
    assert quiet == names, f"alerts never shown quiet: {names - quiet}"
    assert "SUCCESS" in run_promtool(promtool, "test", "rules", UNIT_TESTS)


def test_thresholds_are_parameters(promtool, tmp_path):
    """A team's own SLO moves the alert: lag 90 s pages at the default 60 s, not at 120 s."""
    rules = tmp_path / "rules.yml"
    result = CliRunner().invoke(
        app, ["monitoring", "rules", "--outbox-lag-slo", "120", "--runbook-url",
              "https://wiki.example/postroom/operations", "-o", str(rules)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = rules.read_text()
    assert 'record: "postroom:threshold:outbox_lag_seconds"\n        expr: "vector(120)"' in text
    assert "https://wiki.example/postroom/operations#postroomoutboxlaghigh" in text
    for path, fires in ((RULES, True), (rules, False)):
        case = {
            "rule_files": [str(path)],
            "evaluation_interval": "1m",
            "tests": [
                {
                    "interval": "1m",
                    "input_series": [
                        {
                            "series": "postroom_outbox_oldest_pending_age_seconds{namespace='a'}",
                            "values": "90x10",
                        }
                    ],
                    "alert_rule_test": [
                        {
                            "eval_time": "5m",
                            "alertname": "PostroomOutboxLagHigh",
                            "exp_alerts": _lag_alert(path) if fires else [],
                        }
                    ],
                }
            ],
        }
        test_file = tmp_path / f"lag-{fires}.test.yml"
        test_file.write_text(yaml.safe_dump(case))
        run_promtool(promtool, "test", "rules", test_file)

    kube = CliRunner().invoke(app, ["monitoring", "rules", "--format", "kubernetes"])
    assert kube.exit_code == 0 and 'kind: "PrometheusRule"' in kube.output


def test_dashboard_follows_the_path_with_a_datasource_variable_and_no_job(promtool, tmp_path):
    model = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in model["panels"] if p["type"] != "row"]
    rows = [p["title"] for p in model["panels"] if p["type"] == "row"]
    assert [r.split(".")[0] for r in rows] == ["1", "2", "3", "4", "5", "6"], rows
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert not re.search(r"\bjob\b", target["expr"]), target["expr"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert exprs == dashboard.queries()
    shown = " ".join(exprs)
    for metric in (
        "postroom_outbox_pending_messages",
        "postroom_outbox_oldest_pending_age_seconds",
        "postroom_relay_published_total",
        "postroom_relay_failed_total",
        "postroom_consumer_messages_total",
        "postroom_delivery_latency_seconds_bucket",
        "postroom_queue_messages_ready",
    ):
        assert metric in shown

    # Every query parses: Grafana's variables expanded, each checked as a recording rule.
    records = [
        {"record": f"dashboard:query_{n}", "expr": _expand(expr)} for n, expr in enumerate(exprs)
    ]
    for variable in variables.values():
        if variable["type"] == "query":
            query = variable["query"]["query"]
            match = re.fullmatch(r"label_values\((.*), (\w+)\)", query)
            assert match, query
            records.append({"record": f"dashboard:{variable['name']}", "expr": _expand(match[1])})
    checked = tmp_path / "dashboard.rules.yml"
    checked.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    out = run_promtool(promtool, "check", "rules", checked)
    assert f"SUCCESS: {len(records)} rules found" in out


def _expand(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", "5m")
        .replace("$namespace", ".*")
        .replace("$consumer", ".*")
    )


def _lag_alert(path: Path) -> list[dict[str, Any]]:
    rule = next(r for r in _alert_rules(yaml.safe_load(path.read_text())) if
                r["alert"] == "PostroomOutboxLagHigh")  # fmt: skip
    notes = dict(rule["annotations"])
    notes["description"] = notes["description"].replace("{{ $value | humanizeDuration }}", "1m 30s")
    return [{"exp_labels": {"severity": "critical", "namespace": "a"}, "exp_annotations": notes}]


def _alert_rules(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for group in document["groups"] for r in group["rules"] if "alert" in r]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in markdown.splitlines():
        match = re.match(r"^#{1,6} (.+)$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match[1].strip().lower()).replace(" ", "-")
            found.add(slug)
    return found


def test_every_metric_is_in_the_reference():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from postroom.metrics import Metrics

    metrics = Metrics()
    metrics.readiness("worker", lambda: None)
    families = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        if not family.name.endswith("_created")
    }
    text = OPERATIONS.read_text()
    missing = sorted(name for name in families if f"| `{name}` |" not in text)
    assert not missing, f"docs/operations.md#metrics-reference lacks {missing}"
