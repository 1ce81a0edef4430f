"""The Grafana dashboard: one event's path, from the outbox to the handler, as panels.

Rows follow the path of an event: written to the outbox, waiting there (the lag), published
by the relay, handled by each consumer, end-to-end latency, and what ends as a dead letter.
Every query selects by the dashboard's variables only (``$datasource``, ``$namespace``,
``$consumer``), never by a job name, so it works however the targets are scraped.
:func:`queries` lists every PromQL expression, which the tests parse with promtool.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

UID = "postroom-event-path"
NS = 'namespace=~"$namespace"'
CONSUMER = 'namespace=~"$namespace", consumer=~"$consumer"'
RATE = "$__rate_interval"


@dataclass(frozen=True, slots=True)
class Panel:
    """A time series panel: a title, what it shows, its queries (legend by target)."""

    title: str
    description: str
    targets: tuple[tuple[str, str], ...]
    unit: str = "short"


@dataclass(frozen=True, slots=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def _quantile(q: float, metric: str, by: str, where: str) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{where}}}[{RATE}])))"


def rows() -> list[Row]:
    """Return the dashboard's rows, in the order an event travels."""
    first = f'{CONSUMER}, delivery="first"'
    latency = "postroom_delivery_latency_seconds"
    return [
        Row(
            "1. Written: what the outbox holds",
            (
                Panel(
                    "Outbox rows",
                    "Due rows wait for a relay; errored rows failed to publish and are retried "
                    "with a backoff; unroutable ones have no queue bound.",
                    (
                        (f"max(postroom_outbox_pending_messages{{{NS}}})", "due"),
                        (f"max(postroom_outbox_errored_messages{{{NS}}})", "errored"),
                        (f"max(postroom_outbox_unroutable_messages{{{NS}}})", "unroutable"),
                    ),
                ),
                Panel(
                    "Events relayed per second, by topic",
                    "What producers write, once delivered (flat lag: writes = relayed).",
                    (
                        (
                            "sum by (topic) "
                            f"(rate(postroom_relay_published_total{{{NS}}}[{RATE}]))",
                            "{{topic}}",
                        ),
                    ),
                    "ops",
                ),
            ),
        ),
        Row(
            "2. Waiting: outbox lag",
            (
                Panel(
                    "Oldest undelivered row vs the lag SLO",
                    "Reported by relays and workers alike, so it stays when no relay runs.",
                    (
                        (f"max(postroom_outbox_oldest_pending_age_seconds{{{NS}}})", "lag"),
                        ("max(postroom:threshold:outbox_lag_seconds)", "SLO"),
                    ),
                    "s",
                ),
            ),
        ),
        Row(
            "3. Published: the relay",
            (
                Panel(
                    "Publish failures per second, by topic",
                    "Refused or returned by the broker; the rows stay in the outbox.",
                    (
                        (
                            f"sum by (topic) (rate(postroom_relay_failed_total{{{NS}}}[{RATE}]))",
                            "{{topic}}",
                        ),
                    ),
                    "ops",
                ),
                Panel(
                    "Relay batch duration",
                    "Claim, publish with confirms, settle.",
                    (
                        (
                            _quantile(
                                0.5, "postroom_relay_batch_duration_seconds", "namespace", NS
                            ),
                            "p50",
                        ),
                        (
                            _quantile(
                                0.99, "postroom_relay_batch_duration_seconds", "namespace", NS
                            ),
                            "p99",
                        ),
                    ),
                    "s",
                ),
                Panel(
                    "Relays connected",
                    "Relay processes connected to each peer.",
                    (
                        (
                            f'sum by (peer) (postroom_connection_up{{component="relay", {NS}}})',
                            "{{peer}}",
                        ),
                    ),
                ),
            ),
        ),
        Row(
            "4. Handled: the consumers",
            (
                Panel(
                    "Outcomes per second",
                    "acked: handled and committed; duplicate: already in the inbox; retry; dead.",
                    (
                        (
                            "sum by (consumer, outcome) "
                            f"(rate(postroom_consumer_messages_total{{{CONSUMER}}}[{RATE}]))",
                            "{{consumer}} {{outcome}}",
                        ),
                    ),
                    "ops",
                ),
                Panel(
                    "Messages waiting in each consumer's queue",
                    "Ready messages, as the broker counts them.",
                    (
                        (
                            f"max by (consumer) (postroom_queue_messages_ready{{{CONSUMER}}})",
                            "{{consumer}}",
                        ),
                    ),
                ),
                Panel(
                    "Handler duration p99",
                    "Inbox check, handler and commit of one delivery.",
                    (
                        (
                            _quantile(
                                0.99, "postroom_handler_duration_seconds", "consumer", CONSUMER
                            ),
                            "{{consumer}}",
                        ),
                    ),
                    "s",
                ),
                Panel(
                    "Handlers in flight",
                    "Handlers running now, over all workers.",
                    (
                        (
                            f"sum by (consumer) (postroom_handlers_in_flight{{{CONSUMER}}})",
                            "{{consumer}}",
                        ),
                    ),
                ),
            ),
        ),
        Row(
            "5. End to end: published to handled",
            (
                Panel(
                    "Delivery latency, first attempts",
                    "From the event's publish to the commit of the handler that took it.",
                    (
                        (_quantile(0.5, latency, "consumer", first), "{{consumer}} p50"),
                        (_quantile(0.9, latency, "consumer", first), "{{consumer}} p90"),
                        (_quantile(0.99, latency, "consumer", first), "{{consumer}} p99"),
                        ("max(postroom:threshold:delivery_latency_p99_seconds)", "p99 SLO"),
                    ),
                    "s",
                ),
                Panel(
                    "Delivery latency p99, retries and replays",
                    "Includes the retry backoff and the time spent as a dead letter.",
                    (
                        (
                            _quantile(
                                0.99,
                                latency,
                                "consumer, delivery",
                                f'{CONSUMER}, delivery!="first"',
                            ),
                            "{{consumer}} {{delivery}}",
                        ),
                    ),
                    "s",
                ),
            ),
        ),
        Row(
            "6. Given up: dead letters, and the processes",
            (
                Panel(
                    "New dead letters (15 min)",
                    "See `postroom dead-letters groups`.",
                    (
                        (
                            "sum by (consumer) (increase(postroom_consumer_messages_total"
                            f'{{outcome="dead", {CONSUMER}}}[15m]))',
                            "{{consumer}}",
                        ),
                    ),
                ),
                Panel(
                    "Ready processes",
                    "Relays and workers whose /readyz answers 200.",
                    ((f"sum by (component) (postroom_ready{{{NS}}})", "{{component}}"),),
                ),
                Panel(
                    "Event loop lag",
                    "How late a process's heartbeat ran; high means a blocked loop.",
                    (
                        (
                            f"max by (instance) (postroom_event_loop_lag_seconds{{{NS}}})",
                            "{{instance}}",
                        ),
                    ),
                    "s",
                ),
            ),
        ),
    ]


def queries() -> list[str]:
    """Return every PromQL expression of the dashboard, variables unexpanded."""
    return [expr for row in rows() for panel in row.panels for expr, _ in panel.targets]


_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": _DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def dashboard() -> dict[str, Any]:
    """Return the dashboard as Grafana's JSON model (import it, or provision it)."""
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for row in rows():
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        width = 24 // len(row.panels)
        for index, panel in enumerate(row.panels):
            panels.append(
                {
                    "id": next_id,
                    "type": "timeseries",
                    "title": panel.title,
                    "description": panel.description,
                    "datasource": _DATASOURCE,
                    "gridPos": {"h": 8, "w": width, "x": index * width, "y": y},
                    "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                    "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                    "targets": [
                        {
                            "refId": chr(ord("A") + n),
                            "datasource": _DATASOURCE,
                            "expr": expr,
                            "legendFormat": legend,
                        }
                        for n, (expr, legend) in enumerate(panel.targets)
                    ],
                }
            )
            next_id += 1
        y += 8
    return {
        "uid": UID,
        "title": "postroom: one event's path",
        "description": "Outbox, relay, consumers, end-to-end latency and dead letters.",
        "tags": ["postroom"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-3h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                _variable("namespace", "Namespace", "label_values(postroom_ready, namespace)"),
                _variable(
                    "consumer",
                    "Consumer",
                    "label_values("
                    'postroom_consumer_messages_total{namespace=~"$namespace"}, consumer)',
                ),
            ]
        },
        "panels": panels,
    }


def dumps() -> str:
    """Return the dashboard JSON as written to deploy/grafana/."""
    return json.dumps(dashboard(), indent=2) + "\n"
