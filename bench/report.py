"""Figures, their ratios to baselines, and the three outputs: a table, JSON and plots.

``python -m bench.report RESULTS.json [--out DIR]`` redraws the table and plots of a run.
"""

from __future__ import annotations

import json
import platform
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.env import per_thousand


@dataclass
class Figure:
    """One measured figure; *baseline* names the figure of the same phase it is held to."""

    phase: str
    name: str
    value: float
    unit: str
    messages: int = 0
    seconds: float = 0.0
    baseline: str | None = None
    ratio: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_per_1k: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def with_cpu(self, cpu: dict[str, float]) -> Figure:
        self.cpu = cpu
        self.cpu_per_1k = per_thousand(cpu, self.messages)
        return self


@dataclass
class Results:
    mode: str
    command: str
    figures: list[Figure] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        print(f"  {figure.phase:8} {figure.name:34} {figure.value:10.1f} {figure.unit}", flush=True)
        return figure

    def phase(self, phase: str) -> list[Figure]:
        return [f for f in self.figures if f.phase == phase]

    def find(self, phase: str, name: str) -> Figure | None:
        return next((f for f in self.figures if f.phase == phase and f.name == name), None)

    def resolve_ratios(self) -> None:
        for figure in self.figures:
            if figure.baseline is None:
                continue
            base = self.find(figure.phase, figure.baseline)
            if base is not None and base.value:
                figure.ratio = round(figure.value / base.value, 3)

    def table(self) -> str:
        head = (
            f"{'phase':9}{'figure':36}{'value':>11} {'unit':8}{'ratio':>7}  {'to':28}"
            f"{'cpu-s/1k: client':>17}{'broker':>8}{'pg':>8}"
        )
        lines = [head, "-" * len(head)]
        for f in self.figures:
            ratio = f"{f.ratio:.2f}x" if f.ratio is not None else ""
            per = f.cpu_per_1k

            def cell(key: str, per: dict[str, float] = per) -> str:
                return f"{per[key]:.3f}" if key in per else ""

            lines.append(
                f"{f.phase:9}{f.name:36}{f.value:11.1f} {f.unit:8}{ratio:>7}  "
                f"{f.baseline or '':28}{cell('client'):>17}{cell('broker'):>8}"
                f"{cell('postgres'):>8}"
            )
        return "\n".join(lines)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Results:
        figures = [Figure(**f) for f in data.get("figures", [])]
        return cls(data["mode"], data["command"], figures, data.get("notes", {}))

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "command": self.command,
            "machine": {"python": platform.python_version(), "cores": _cores()},
            "notes": self.notes,
            "figures": [asdict(f) for f in self.figures],
        }

    def write(self, out: Path, stamp: str) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        written = [out / f"bench-{stamp}.json", out / "latest.json"]
        text = json.dumps(self.to_json(), indent=2, default=str)
        for path in written:
            path.write_text(text)
        written += plot(self, out)
        return written


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def quantile(values: list[float], q: float) -> float:
    """The *q* quantile (0-1) of *values*, interpolated in 1000 steps."""
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1]


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.fmean(values) if values else 0.0


def plot(results: Results, out: Path) -> list[Path]:
    """Throughput beside baselines per phase; latency against offered rate for e2e."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    bar_phases = [p for p in ("relay", "write", "consumer") if results.phase(p)]
    if bar_phases:
        fig, axes = plt.subplots(
            1, len(bar_phases), figsize=(5.2 * len(bar_phases), 4.2), squeeze=False
        )
        for ax, phase in zip(axes[0], bar_phases, strict=True):
            figures = results.phase(phase)
            names = [f.name for f in figures]
            values = [f.value for f in figures]
            colors = ["#8c8c8c" if f.name.startswith("raw") else "#1f77b4" for f in figures]
            bars = ax.barh(names, values, color=colors)
            for bar, f in zip(bars, figures, strict=True):
                label = f"{f.value:,.0f}" + (f"  ({f.ratio:.2f}x)" if f.ratio else "")
                ax.text(
                    bar.get_width(),
                    bar.get_y() + bar.get_height() / 2,
                    " " + label,
                    va="center",
                    fontsize=7,
                )
            ax.invert_yaxis()
            ax.set_title(f"{phase} ({figures[0].unit}; grey = raw baseline)", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.set_xlim(0, max(values) * 1.45 if values else 1)
        fig.tight_layout()
        path = out / "throughput.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    e2e = [f for f in results.phase("e2e") if "offered" in f.extra]
    if e2e:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        series: dict[str, list[Figure]] = {}
        for f in e2e:
            series.setdefault(f.extra["series"], []).append(f)
        for label, figures in series.items():
            figures.sort(key=lambda f: f.extra["offered"])
            x = [f.extra["offered"] for f in figures]
            for q, style in (("p50", "-o"), ("p99", "--^")):
                ax.plot(x, [f.extra[q] for f in figures], style, label=f"{label} {q}", markersize=4)
        relay_stage = sorted(
            (
                f
                for f in e2e
                if f.extra["series"] == "notify" and f.extra.get("commit_to_broker_p99")
            ),
            key=lambda f: f.extra["offered"],
        )
        if relay_stage:  # the relay's share: commit -> delivery to a plain tap queue
            ax.plot(
                [f.extra["offered"] for f in relay_stage],
                [f.extra["commit_to_broker_p99"] for f in relay_stage],
                ":s",
                color="black",
                label="notify: commit -> broker delivery p99",
                markersize=4,
            )
        ax.set_yscale("log")
        ax.set_xlabel("offered rate (msg/s)")
        ax.set_ylabel("commit -> handler latency (ms)")
        ax.axhline(20, color="#bbbbbb", linewidth=0.8)
        ax.legend(fontsize=7)
        ax.set_title("end to end latency vs offered rate", fontsize=9)
        fig.tight_layout()
        path = out / "latency.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report")
    parser.add_argument("path", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: the JSON's folder")
    args = parser.parse_args()
    results = Results.from_json(json.loads(args.path.read_text()))
    print(results.table())
    for path in plot(results, args.out or args.path.parent):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
