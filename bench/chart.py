"""docs/performance.png: the recorded broker figures as a chart (beside the table in docs/performance.md).

    .venv/bin/python -m bench.chart [bench/recorded/<run>.json] [-o docs/performance.png]

Reads one recorded run of ``bench/run.py`` (default: :data:`RECORDED`, the run the
table in docs/performance.md shows) and draws three panels: throughput (publish,
drain solo, drain prefork -c2; tasks/s), wake-up latency after a commit (p50 and
p99, ms, log scale) and claim+ack with 1,000 vs a large backlog waiting. Needs
matplotlib (the ``chart`` extra: ``scripts/setup.sh chart``); it is not imported
by anything else.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # after the backend is chosen

ROOT = Path(__file__).resolve().parent.parent
#: The run whose figures docs/performance.md's table shows.
RECORDED = ROOT / "bench" / "recorded" / "2026-11-29-e.json"
#: Where the chart goes.
OUTPUT = ROOT / "docs" / "performance.png"
WAKE = "wake-up after a commit (ms, log scale, lower is better)"
#: Panels whose figures span orders of magnitude.
LOG_SCALE = frozenset({WAKE})
#: Panel -> (column of a recorded row, label) pairs.
PANELS: dict[str, tuple[tuple[str, str], ...]] = {
    "throughput (tasks/s, higher is better)": (
        ("publish_per_s", "publish"),
        ("drain_solo_per_s", "drain solo"),
        ("drain_prefork2_per_s", "drain prefork -c2"),
    ),
    WAKE: (
        ("wake_p50_ms", "p50"),
        ("wake_p99_ms", "p99"),
    ),
    "claim+ack with a backlog waiting (tasks/s)": (
        ("backlog_1k_per_s", "1,000 waiting"),
        ("backlog_large_per_s", "large backlog"),
    ),
}


def render(recorded: Path, output: Path) -> Path:
    """Draw ``recorded``'s rows into ``output`` (PNG); returns ``output``."""
    rows: list[dict[str, Any]] = json.loads(recorded.read_text())["rows"]
    figure, axes = plt.subplots(1, len(PANELS), figsize=(16, 5.2))
    for axis, (title, columns) in zip(axes, PANELS.items(), strict=True):
        shown = [row for row in rows if any(row.get(column) is not None for column, _ in columns)]
        width = 0.8 / len(columns)
        for n, (column, label) in enumerate(columns):
            positions = [i + (n - (len(columns) - 1) / 2) * width for i in range(len(shown))]
            values = [row.get(column) or 0.0 for row in shown]
            bars = axis.bar(positions, values, width, label=label)
            axis.bar_label(bars, fmt="%.0f" if max(values) >= 100 else "%.1f", fontsize=7, rotation=90)
        axis.set_xticks(range(len(shown)), [row["contender"] for row in shown], rotation=20, ha="right")
        if title in LOG_SCALE:
            axis.set_yscale("log")
        axis.margins(y=0.15)  # room for the figures above the bars
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"Brokers side by side, one 2-core machine ({recorded.stem})")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recorded", nargs="?", type=Path, default=RECORDED, help="a recorded run")
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT, help="the PNG to write")
    args = parser.parse_args()
    print(render(args.recorded, args.output))


if __name__ == "__main__":
    main()
