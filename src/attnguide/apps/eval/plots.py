"""The PNG plots of ``attnguide eval``: metric curves of the sweeps, bar charts of the tables, cost bars."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import write_atomic

__all__ = ["write_plots"]

#: (metric key, panel title) of the sweep plots.
_METRICS = (
    ("fid", "FID (lower is better)"),
    ("sfid", "sFID"),
    ("is", "IS"),
    ("precision", "Precision"),
    ("recall", "Recall"),
)

#: The panels of the table bar charts: FID, IS and precision.
_TABLE_METRICS = (_METRICS[0], _METRICS[2], _METRICS[3])


def _nan_for_none(values: Sequence[Any]) -> list[Any]:
    return [math.nan if v is None else v for v in values]


def _save(fig: Any, path: Path, written: list[Path]) -> None:
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=110))
    written.append(path)


def _sweep_figure(name: str, rows: list[dict[str, Any]], num_samples: int) -> Any:
    """One panel per metric against the SAG scale (``scale``) or the blur sigma (``sigma``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 3.2))
    axes = fig.subplots(1, len(_METRICS))
    if name == "scale":
        base = next(r for r in rows if r["baseline"] is None)
        xs = [r["x"] for r in rows]
        ticks = None
    else:
        base = rows[0]
        xs = list(range(len(rows)))
        ticks = ["0" if r["x"] == 0 else ("inf" if r["x"] is None else f"{r['x']:g}") for r in rows]
    for ax, (key, title) in zip(axes, _METRICS, strict=True):
        ax.plot(xs, _nan_for_none([r["metrics"].get(key) for r in rows]), "o-")
        bv = base["metrics"].get(key)
        if bv is not None:
            ax.axhline(bv, ls=":", color="gray", label="baseline")
        ax.set_title(title)
        ax.set_xlabel("SAG scale s" if name == "scale" else "blur sigma")
        if ticks:
            ax.set_xticks(xs)
            ax.set_xticklabels(ticks)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{name}: {num_samples} samples per point")
    return fig


def _bar_figure(
    labels: Sequence[str], panels: Sequence[tuple[Sequence[Any], str]], figsize: tuple[float, float]
) -> Any:
    """One bar chart per (values, title) panel, the bars labelled ``labels``. Beyond 10 bars the figure
    widens with them and the labels stand upright, so long experiments (cfg: 22 rows) stay readable."""
    from matplotlib.figure import Figure

    many = len(labels) > 10
    if many:
        figsize = (max(figsize[0], 0.3 * len(labels) * len(panels)), figsize[1] + 2.0)
    fig = Figure(figsize=figsize)
    axes = fig.subplots(1, len(panels))
    for ax, (vals, title) in zip(axes, panels, strict=True):
        ax.bar(range(len(labels)), _nan_for_none(vals), color="tab:blue")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90 if many else 35, ha="center" if many else "right", fontsize=8)
        ax.set_title(title)
    return fig


def _cost_figure(cost: dict[str, Any]) -> Any:
    """Seconds per batch and peak memory of each method of the cost experiment."""
    from matplotlib.figure import Figure

    rows = cost["rows"]
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2)
    axes[0].bar(range(len(rows)), [r["seconds"] for r in rows])
    axes[0].set_title(f"seconds per batch of {cost['batch']}")
    axes[1].bar(range(len(rows)), [r["peak_memory_mib"] for r in rows], color="tab:orange")
    axes[1].set_title("peak memory above start (MiB)")
    for ax in axes:
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["method"] for r in rows], rotation=35, ha="right", fontsize=8)
    return fig


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Write ``<experiment>.png`` into ``out`` for each experiment (and ``cost.png``) in ``results``;
    returns the paths written."""
    written: list[Path] = []
    exps = results["experiments"]
    for name in ("scale", "sigma"):
        if name in exps:
            fig = _sweep_figure(name, exps[name]["rows"], results["config"]["num_samples"])
            _save(fig, out / f"{name}.png", written)
    for name in exps:  # the tables (table1, masking, cfg, and any other experiment): bar charts
        if name not in ("scale", "sigma", "window"):
            rows = exps[name]["rows"]
            panels = [([r["metrics"].get(key) for r in rows], title) for key, title in _TABLE_METRICS]
            fig = _bar_figure([r["label"] for r in rows], panels, (12, 3.6))
            _save(fig, out / f"{name}.png", written)
    if "window" in exps:
        rows = exps["window"]["rows"]
        panels = [
            ([r["metrics"].get("fid") for r in rows], "FID (lower is better)"),
            ([r.get("seconds_per_sample") for r in rows], "sampling seconds per sample"),
        ]
        _save(_bar_figure([r["label"] for r in rows], panels, (10, 3.6)), out / "window.png", written)
    if "cost" in results and results["cost"].get("rows"):
        _save(_cost_figure(results["cost"]), out / "cost.png", written)
    return written
