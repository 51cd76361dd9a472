"""PNG plots of the ops suite: per op, speedup and % of floor against bytes moved.

matplotlib (Agg backend) is imported here only, when a plot is drawn.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence


def plot_ops(rows: Sequence[dict], path: str | Path, title: str) -> Path | None:
    """One figure, one column per op: top, speedup of the fast path over eager and each baseline;
    bottom, % of the measured floor of what was timed; both against the case's bytes moved.

    Returns the PNG's path, or None when no row was timed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    by_op: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("eager_us") is not None and row.get("bytes_moved"):
            by_op[row["op"]].append(row)
    if not by_op:
        return None
    ops = sorted(by_op)
    fig, axes = plt.subplots(2, len(ops), figsize=(4.2 * len(ops), 6.4), squeeze=False)
    for j, op in enumerate(ops):
        cases = sorted(by_op[op], key=lambda r: r["bytes_moved"])
        x = [r["bytes_moved"] for r in cases]
        top, bottom = axes[0][j], axes[1][j]
        speed_lines = {"eager": [r.get("speedup_eager") for r in cases]}
        for name in sorted({k[len("speedup_"):] for r in cases for k in r if k.startswith("speedup_")}):
            if name not in ("eager", "baselines"):
                speed_lines[name] = [r.get(f"speedup_{name}") for r in cases]
        drawn = False
        for name, ys in speed_lines.items():
            points = [(a, b) for a, b in zip(x, ys) if b is not None]
            if points:
                top.plot(*zip(*points), marker="o", label=f"vs {name}")
                drawn = True
        if drawn:
            top.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            top.legend(fontsize=8)
        else:
            top.text(0.5, 0.5, "fast path not timed here\n(no CUDA)", ha="center", va="center",
                     transform=top.transAxes, fontsize=9, color="grey")
            top.set_xticks([])
        top.set_title(op)
        top.set_ylabel("speedup (×)")
        timed = cases[0].get("timed") or "eager"
        pct = [(a, r.get("pct_floor")) for a, r in zip(x, cases) if r.get("pct_floor") is not None]
        if pct:
            bottom.plot(*zip(*pct), marker="s", color="tab:green", label=f"{timed}")
            bottom.legend(fontsize=8)
        bottom.set_xlabel("bytes moved per call")
        bottom.set_ylabel("% of measured floor")
        bottom.set_ylim(bottom=0)
        wide = max(x) >= 10 * min(x)  # a log axis only pays over more than a decade
        for ax in (top, bottom):
            ax.grid(True, which="both", alpha=0.3)
            if wide:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels crowd the axis
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
