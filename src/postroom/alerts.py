"""The alert rules a platform team loads: one source, two formats, thresholds as parameters.

:func:`rule_groups` builds the rules from :class:`Thresholds`; :func:`prometheus_rules`
renders them as a plain Prometheus rules file and :func:`prometheus_rule` as a
kube-prometheus ``PrometheusRule``, so the two can never disagree. The files under
``deploy/prometheus/`` are this module's output with the defaults (a test regenerates and
compares them); ``postroom monitoring rules --outbox-lag-slo 120 ...`` writes them with
other thresholds.

Every threshold is also a recording rule (``postroom:threshold:*``) evaluated first in the
group, so the numbers live in one visible place: the dashboard draws them as SLO lines and
a team may edit the recorded ``vector(...)`` instead of regenerating. Every alert carries a
severity, a summary, a description and a ``runbook_url`` to its section of
docs/operations.md. Alerts aggregate by :attr:`Thresholds.group_by` (``namespace`` by
default: one postroom deployment per namespace); without that label everything is one
group, which is right for a single deployment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

RUNBOOK_URL = "docs/operations.md"
"""Where the runbook lives; pass an absolute URL of your copy so pages link to it."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The numbers an alert compares with; each has a recording rule of its own."""

    outbox_lag_seconds: float = 60.0
    """The outbox lag SLO: the oldest due (or failed) row may wait this long."""
    delivery_latency_p99_seconds: float = 30.0
    """The delivery SLO: p99 of first attempts, event published to handler committed."""
    retry_ratio: float = 0.1
    """Share of a consumer's outcomes that may be retries before it is "spiking"."""
    dead_letters: float = 0.0
    """New dead letters per consumer tolerated in 15 minutes; above it, a warning."""
    stalled_minutes: int = 10
    """How long a consumer may have messages waiting and handle none."""
    group_by: tuple[str, ...] = ("namespace",)
    """Labels that tell one postroom deployment from another."""
    runbook_url: str = RUNBOOK_URL


@dataclass(frozen=True, slots=True)
class Alert:
    """One alerting rule and what the page says."""

    name: str
    expr: str
    duration: str
    severity: str
    summary: str
    description: str
    anchor: str
    """The heading of docs/operations.md this alert's runbook is under (GitHub slug)."""


def _threshold_records(t: Thresholds) -> list[dict[str, Any]]:
    values = {
        "outbox_lag_seconds": t.outbox_lag_seconds,
        "delivery_latency_p99_seconds": t.delivery_latency_p99_seconds,
        "retry_ratio": t.retry_ratio,
        "dead_letters": t.dead_letters,
    }
    return [
        {"record": f"postroom:threshold:{name}", "expr": f"vector({_number(value)})"}
        for name, value in values.items()
    ]


def threshold(name: str) -> str:
    """Return PromQL for the threshold *name* (a field of :class:`Thresholds`)."""
    return f"scalar(postroom:threshold:{name})"


def alerts(t: Thresholds) -> list[Alert]:
    """Return every postroom alert for thresholds *t*."""
    by = ", ".join(t.group_by)
    on = f"on ({by})"
    cby = ", ".join((*t.group_by, "consumer"))
    ratio = 'rate(postroom_consumer_messages_total{outcome="retry"}[10m])'
    stalled = f"{t.stalled_minutes}m"
    return [
        Alert(
            name="PostroomOutboxLagHigh",
            expr=f"max by ({by}) (postroom_outbox_oldest_pending_age_seconds)\n"
            f"  > {threshold('outbox_lag_seconds')}",
            duration="2m",
            severity="critical",
            summary="Events wait in the outbox longer than the lag SLO.",
            description="The oldest undelivered outbox row has waited "
            "{{ $value | humanizeDuration }} (rows whose publish failed count from when they "
            "were written).",
            anchor="postroomoutboxlaghigh",
        ),
        Alert(
            name="PostroomRelayDown",
            expr=f"(max by ({by}) (postroom_outbox_last_poll_timestamp_seconds)\n"
            f"  unless {on} (max by ({by}) "
            '(postroom_connection_up{component="relay", peer="broker"}) == 1))\n'
            'or absent(postroom_connection_up{component="relay"})',
            duration="5m",
            severity="critical",
            summary="No relay is connected: nothing is delivered from the outbox.",
            description="{{ with $labels.component }}No relay reports metrics: none is running "
            "or none is scraped.{{ else }}Workers report the outbox, but no relay reports a "
            "broker connection: relays are down, crash-looping or cannot connect.{{ end }}",
            anchor="postroomrelaydown",
        ),
        Alert(
            name="PostroomDeadLettersGrowing",
            expr=f"sum by ({cby}) "
            '(increase(postroom_consumer_messages_total{outcome="dead"}[15m]))\n'
            f"  > {threshold('dead_letters')}",
            duration="0m",
            severity="warning",
            summary="Consumer {{ $labels.consumer }} makes dead letters.",
            description="{{ $value | humanize }} new dead letters in 15 minutes.",
            anchor="postroomdeadlettersgrowing",
        ),
        Alert(
            name="PostroomConsumerStalled",
            expr=f"max by ({cby}) (postroom_queue_messages_ready) > 0\n"
            f"unless on ({cby}) "
            f"(sum by ({cby}) (rate(postroom_consumer_messages_total[{stalled}])) > 0)",
            duration=stalled,
            severity="critical",
            summary="Consumer {{ $labels.consumer }} has messages waiting and handles none.",
            description="{{ $value }} messages are ready in its queue and it finished no "
            f"delivery for {stalled}.",
            anchor="postroomconsumerstalled",
        ),
        Alert(
            name="PostroomWorkerNotReady",
            expr=f"max by ({', '.join((*t.group_by, 'instance'))}) "
            '(postroom_ready{component="worker"}) == 0\n'
            'or absent(postroom_ready{component="worker"})',
            duration="5m",
            severity="warning",
            summary="A worker is not ready (not consuming), or no worker reports.",
            description="{{ with $labels.instance }}Worker {{ . }} has not been ready for 5 "
            "minutes: it cannot reach the database or the broker, or keeps reconnecting."
            "{{ else }}No worker reports metrics: none is running or none is scraped.{{ end }}",
            anchor="postroomworkernotready",
        ),
        Alert(
            name="PostroomRetriesSpiking",
            expr=f"sum by ({cby}) ({ratio})\n"
            f"  / sum by ({cby}) (rate(postroom_consumer_messages_total[10m]))\n"
            f"  > {threshold('retry_ratio')}",
            duration="10m",
            severity="warning",
            summary="Consumer {{ $labels.consumer }}'s handler fails often.",
            description="{{ $value | humanizePercentage }} of its deliveries are rescheduled "
            "as retries.",
            anchor="postroomretriesspiking",
        ),
        Alert(
            name="PostroomUnroutableRows",
            expr=f"max by ({by}) (postroom_outbox_unroutable_messages) > 0",
            duration="5m",
            severity="warning",
            summary="Outbox rows have no queue to go to.",
            description="{{ $value }} rows were returned by the broker as unroutable: no queue "
            "is bound for their routing key.",
            anchor="postroomunroutablerows",
        ),
        Alert(
            name="PostroomDeliveryLatencyHigh",
            expr="histogram_quantile(0.99,\n"
            f"  sum by ({cby}, le) "
            '(rate(postroom_delivery_latency_seconds_bucket{delivery="first"}[10m])))\n'
            f"  > {threshold('delivery_latency_p99_seconds')}",
            duration="10m",
            severity="critical",
            summary="Consumer {{ $labels.consumer }} gets its events later than the SLO.",
            description="p99 from publish to the handler's commit (first attempts) is "
            "{{ $value | humanizeDuration }}.",
            anchor="postroomdeliverylatencyhigh",
        ),
    ]


def rule_groups(t: Thresholds | None = None) -> list[dict[str, Any]]:
    """Return the rule groups (thresholds first, then alerts) as plain data."""
    t = t or Thresholds()
    rules: list[dict[str, Any]] = _threshold_records(t)
    for alert in alerts(t):
        rules.append(
            {
                "alert": alert.name,
                "expr": alert.expr,
                "for": alert.duration,
                "labels": {"severity": alert.severity},
                "annotations": {
                    "summary": alert.summary,
                    "description": alert.description,
                    "runbook_url": f"{t.runbook_url}#{alert.anchor}",
                },
            }
        )
    return [{"name": "postroom", "rules": rules}]


def prometheus_rules(t: Thresholds | None = None) -> str:
    """Render the rules as a Prometheus rules file (``rule_files:``)."""
    return _HEADER + to_yaml({"groups": rule_groups(t)})


def prometheus_rule(t: Thresholds | None = None, *, name: str = "postroom") -> str:
    """Render the rules as a kube-prometheus ``PrometheusRule`` object."""
    document = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/name": "postroom",
                "app.kubernetes.io/part-of": "postroom",
            },
        },
        "spec": {"groups": rule_groups(t)},
    }
    return _HEADER + to_yaml(document)


_HEADER = (
    "# Generated by `postroom monitoring rules` (src/postroom/alerts.py); do not edit by hand\n"
    "# except the postroom:threshold:* values. See docs/operations.md#alerts.\n"
)


def to_yaml(value: Any, indent: int = 0) -> str:
    """Render plain data (dicts, lists, strings, numbers) as block YAML.

    Scalars are JSON (YAML 1.2 is a superset of it), multi-line strings literal blocks;
    enough for rules and manifests without a YAML library at run time.
    """
    pad = " " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:\n{to_yaml(item, indent + 2)}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item, indent + 2)}\n")
        return "".join(lines)
    if isinstance(value, list):
        lines = []
        for item in value:
            body = to_yaml(item, indent + 2) if isinstance(item, dict | list) and item else None
            if body is None:
                lines.append(f"{pad}- {_scalar(item, indent + 2)}\n")
            else:
                lines.append(f"{pad}- {body[indent + 2 :]}")
        return "".join(lines)
    return f"{pad}{_scalar(value, indent)}\n"


def _scalar(value: Any, indent: int) -> str:
    if isinstance(value, str) and "\n" in value:
        pad = " " * indent
        return "|-\n" + "\n".join(f"{pad}{line}" if line else "" for line in value.split("\n"))
    if isinstance(value, dict | list):
        return "{}" if isinstance(value, dict) else "[]"
    return json.dumps(value)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
