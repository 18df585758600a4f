"""The Pareto front of precision assignment as a PNG: budget against total sensitivity.

Drawn from a report's assign-precision stats (``pareto``, ``budget``, ``total_sensitivity``), so a
saved report.json can be plotted again. Needs matplotlib (``pip install 'qcompiler[plot]'``).
"""

from __future__ import annotations

import os
from pathlib import Path

from qcompiler.errors import QCError


def require_matplotlib(option: str = "--plot") -> None:
    """Fail before any work is done when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise QCError("plotting needs matplotlib: pip install 'qcompiler[plot]'", option=option) from None


def plot_pareto(stats: dict, path: str | os.PathLike, title: str = "") -> Path:
    """Write the exact optimum at each budget (the front) and the chosen assignment to ``path``."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    front = stats.get("pareto") or []
    if not front:
        raise QCError("no Pareto front in the assign-precision stats (pareto-points=0?)", pass_name="assign-precision", option="pareto-points")
    budget = stats["budget"]
    scale, unit = (1 / 8 / 1024, "KiB of weights") if budget["kind"] in ("size", "bits") else (1 / budget["full_width"], f"fraction of the full-width model's {budget['kind']}")
    xs = [p["resource"] * scale for p in front]
    ys = [p["total_sensitivity"] for p in front]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.plot(xs, ys, marker="o", ms=4, label="exact optimum (ILP) per budget")
    ax.scatter([budget["used"] * scale], [stats["total_sensitivity"]], color="crimson", zorder=3, label=f"chosen ({stats['method']}, {budget['kind']}={budget['value']})")
    ax.axvline(budget["limit"] * scale, color="crimson", ls="--", lw=0.8, label="budget")
    ax.set_yscale("log" if min(ys) > 0 else "linear")
    ax.set_xlabel(unit)
    ax.set_ylabel("total sensitivity  Σ Ω_l(b_l)")
    ax.set_title(title or "Precision assignment: budget vs sensitivity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(target)  # never a half-written PNG
    return target
