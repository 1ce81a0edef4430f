"""``postroom monitoring``: write the alert rules and the Grafana dashboard.

The files under deploy/prometheus and deploy/grafana are this command's output with the
defaults; run it with your own SLOs to get yours (docs/operations.md, "Alerts").
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from postroom import alerts, dashboard

monitoring_app = typer.Typer(
    no_args_is_help=True, help="Alert rules and the Grafana dashboard for your monitoring."
)


_DEFAULTS = alerts.Thresholds()


class RuleFormat(enum.StrEnum):
    """How the rules are wrapped."""

    PROMETHEUS = "prometheus"
    """A rules file for Prometheus' ``rule_files``."""
    KUBERNETES = "kubernetes"
    """A kube-prometheus (prometheus-operator) ``PrometheusRule`` object."""


def _write(text: str, output: Path | None) -> None:
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {output}", err=True)


@monitoring_app.command()
def rules(
    format_: Annotated[
        RuleFormat,
        typer.Option("--format", help="prometheus: a rules file; kubernetes: a PrometheusRule."),
    ] = RuleFormat.PROMETHEUS,
    outbox_lag_slo: Annotated[
        float, typer.Option(min=0, help="Seconds the oldest outbox row may wait.")
    ] = _DEFAULTS.outbox_lag_seconds,
    latency_slo: Annotated[
        float, typer.Option(min=0, help="p99 seconds from publish to handled (first attempts).")
    ] = _DEFAULTS.delivery_latency_p99_seconds,
    retry_ratio: Annotated[
        float, typer.Option(min=0, max=1, help="Share of outcomes that may be retries.")
    ] = _DEFAULTS.retry_ratio,
    dead_letters: Annotated[
        float, typer.Option(min=0, help="New dead letters per consumer tolerated in 15 min.")
    ] = _DEFAULTS.dead_letters,
    stalled_minutes: Annotated[
        int,
        typer.Option(min=1, help="Minutes a consumer may have messages waiting, handling none."),
    ] = _DEFAULTS.stalled_minutes,
    group_by: Annotated[
        str, typer.Option(help="Comma-separated labels telling postroom deployments apart.")
    ] = "namespace",
    runbook_url: Annotated[
        str, typer.Option(help="URL of docs/operations.md as your people can open it.")
    ] = alerts.RUNBOOK_URL,
    name: Annotated[str, typer.Option(help="metadata.name of the PrometheusRule.")] = "postroom",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here, not stdout.")
    ] = None,
) -> None:
    """Write the alert rules, thresholds given here (also kept as recording rules)."""
    labels = tuple(label.strip() for label in group_by.split(",") if label.strip())
    thresholds = alerts.Thresholds(
        outbox_lag_seconds=outbox_lag_slo,
        delivery_latency_p99_seconds=latency_slo,
        retry_ratio=retry_ratio,
        dead_letters=dead_letters,
        stalled_minutes=stalled_minutes,
        group_by=labels,
        runbook_url=runbook_url,
    )
    if format_ is RuleFormat.KUBERNETES:
        _write(alerts.prometheus_rule(thresholds, name=name), output)
    else:
        _write(alerts.prometheus_rules(thresholds), output)


@monitoring_app.command("dashboard")
def dashboard_command(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here, not stdout.")
    ] = None,
) -> None:
    """Write the Grafana dashboard JSON (import it, or provision it from a file)."""
    _write(dashboard.dumps(), output)
