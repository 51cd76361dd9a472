"""PNG plots of the benchmark suites: only what was measured, as bars.

- ops: one panel per op, one group of bars per case: the time of each path that was timed (fast
  path, eager reference, baselines), with the % of the measured floor of the suite's main path.
  What was not timed (the Triton kernels on the CPU) is said once, under the figure.
- e2e: one panel per (model, dtype) and scenario, one bar per engine: tokens/s, labelled with the
  ratio to HF generate in the same run.

matplotlib (Agg backend) is imported here only, when a plot is drawn.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

_COLOURS = {"fast": "tab:blue", "eager": "tab:orange"}
_BASELINE_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:olive")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_ops(rows: Sequence[dict], path: str | Path, title: str, not_timed: str | None = None) -> Path | None:
    """Per op, the measured time of every timed path in every case (horizontal bars, µs).

    Parameters
    ----------
    rows : sequence of dict
        Ops-suite rows (`runner.run_case`); rows without a timing are left out.
    path : str or Path
        Where to write the PNG.
    title : str
        The figure's title (device, date).
    not_timed : str, optional
        One sentence under the figure saying what was not timed here and why.

    Returns
    -------
    Path or None
        The PNG's path, or None when no row was timed.
    """
    by_op: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("eager_us") is not None:
            by_op[row["op"]].append(row)
    if not by_op:
        return None
    plt = _pyplot()
    ops = sorted(by_op)
    n_rows, n_cols = _grid(len(ops), 3)
    tallest = max(len(v) for v in by_op.values())
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5.2 * n_cols, (1.2 + 0.55 * tallest) * n_rows + 0.8),
                             squeeze=False)
    for ax in axes.flat[len(ops):]:
        ax.set_visible(False)
    for ax, op in zip(axes.flat, ops):
        cases = by_op[op]
        paths = ["fast", "eager"] + sorted({k[:-3] for r in cases for k in r
                                            if k.endswith("_us") and k[:-3] not in ("fast", "eager", "floor")})
        paths = [p for p in paths if any(r.get(f"{p}_us") is not None for r in cases)]
        height = 0.8 / len(paths)
        for j, name in enumerate(paths):
            ys = [i + (j - (len(paths) - 1) / 2) * height for i in range(len(cases))]
            colour = _COLOURS.get(name, _BASELINE_COLOURS[j % len(_BASELINE_COLOURS)])
            points = [(y, r.get(f"{name}_us")) for y, r in zip(ys, cases) if r.get(f"{name}_us") is not None]
            ax.barh([y for y, _ in points], [v for _, v in points], height=height, color=colour, label=name)
        for i, r in enumerate(cases):
            main = r.get(r.get("primary") or "") or r.get("fast_us") or r.get("eager_us")
            if r.get("pct_floor") is not None and main:
                ax.annotate(f" {r['pct_floor']:.2g}% of floor", (main, i), fontsize=7, va="center")
        ax.set_yticks(range(len(cases)), [str(r.get("case", "")) for r in cases], fontsize=7)
        ax.invert_yaxis()
        values = [r.get(f"{p}_us") for r in cases for p in paths if r.get(f"{p}_us")]
        if values and max(values) >= 10 * min(values):  # a log axis only pays over more than a decade
            ax.set_xscale("log")
        ax.set_xlabel("µs per call (median; lower is faster)")
        ax.set_title(op)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    if not_timed:
        fig.text(0.5, 0.005, not_timed, ha="center", va="bottom", fontsize=8, color="dimgrey", wrap=True)
    fig.tight_layout(rect=(0, 0.04 if not_timed else 0, 1, 1))
    return _save(fig, plt, path)


def plot_e2e(rows: Sequence[dict], path: str | Path, title: str) -> Path | None:
    """Tokens/s of every engine in every scenario, one panel per (model, dtype, scenario), with
    the ratio to HF `generate` where the run measured one.

    Returns the PNG's path, or None when no row has a tokens/s figure.
    """
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if isinstance(row.get("tok_s"), (int, float)):
            panels[(row.get("model"), row.get("run_dtype", row.get("dtype")), row.get("scenario"))].append(row)
    if not panels:
        return None
    plt = _pyplot()
    n_rows, n_cols = _grid(len(panels), 3)
    tallest = max(len(v) for v in panels.values())
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(6.2 * n_cols, (1.3 + 0.42 * tallest) * n_rows + 0.6),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, ((model, dtype, scenario), members) in zip(axes.flat, panels.items()):
        names = [f"{r['engine']} ({r['dtype']})" if r.get("dtype") != dtype else r["engine"] for r in members]
        speeds = [r["tok_s"] for r in members]
        colours = ["tab:grey" if r["engine"].startswith("HF") else
                   "tab:orange" if "reference" in r["engine"] or "ref" in r["engine"].split() else "tab:blue"
                   for r in members]
        ax.barh(range(len(members)), speeds, color=colours)
        for i, r in enumerate(members):
            label = f" {r['tok_s']:,.1f}"
            if r.get("speedup_hf") is not None:
                label += f"  ({r['speedup_hf']:.2f}× HF)"
            ax.annotate(label, (r["tok_s"], i), fontsize=7, va="center")
        ax.set_yticks(range(len(members)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, max(speeds) * 1.45)  # room for the labels
        ax.set_xlabel("tokens/s (higher is faster)")
        ax.set_title(f"{model} {dtype}: {scenario}", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)
