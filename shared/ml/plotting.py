"""Writing matplotlib figures atomically (a reader never sees half a PNG), and the results chart of a training
report (results.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.files import atomic_path


def save_png(fig: Any, path: Path, dpi: int = 110) -> None:
    """Save `fig` as PNG at `path` through a temporary file in the same folder, then close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


RESULT_COLUMNS = (("zero_shot", "zero-shot"), ("single", "single adapter"), ("ensemble", "ensemble"))


def cost_lines(report: dict[str, Any]) -> list[str]:
    """What the ensemble cost against the single all-task adapter, as short lines (none when not known)."""
    cost = report.get("cost") or {}
    lines = []
    if cost.get("ensemble_vs_single_flops") is not None:
        text = f"training compute: ensemble {cost['ensemble_vs_single_flops']:.2f}x the single adapter"
        if cost.get("ensemble_with_affinity_vs_single_flops") is not None:
            text += f" ({cost['ensemble_with_affinity_vs_single_flops']:.2f}x with affinity estimation)"
        lines.append(text)
    members = (cost.get("inference") or {}).get("mean_members_per_example")
    if members is not None:
        lines.append(f"inference: {members:.2f} adapters run per example (single: 1)")
    return lines


def results_chart(report: dict[str, Any], path: Path) -> None:
    """results.png of a training report: per task (and the average) the accuracy of the zero-shot base, the
    single all-task adapter and the ensemble, with the cost lines under the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = {**report["tasks"], "average": report["average"]}
    columns = [(key, label) for key, label in RESULT_COLUMNS if any(key in r for r in rows.values())]
    names = list(rows)
    x = np.arange(len(names))
    width = 0.8 / max(len(columns), 1)
    lines = cost_lines(report)
    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(names) + 3), 4.8 + 0.25 * len(lines)))
    for k, (key, label) in enumerate(columns):
        values = [100 * rows[n][key] if rows[n].get(key) is not None else np.nan for n in names]
        ax.bar(x + (k - (len(columns) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.axvline(len(names) - 1.5, color="grey", linewidth=0.8, linestyle=":")  # tasks | average
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=max(len(columns), 1), frameon=False)
    ax.set_title("\n".join([f"accuracy per task on {report.get('split', 'test')}", *lines]), fontsize="medium")
    fig.tight_layout()
    save_png(fig, path)
