"""Pictures of masks. Needs matplotlib (``pip install matplotlib``); nothing else in the package does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from lightning_snip.report import TensorSparsity

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def sparsity_bar_chart(rows: Sequence[TensorSparsity], title: str = "SNIP: kept weights per tensor") -> Figure:
    """A bar chart of the fraction of weights each tensor keeps, on a log scale, each bar labelled.

    At 98-99% sparsity every tensor's sparsity reads "almost 100%" on a linear axis; the kept fraction on a log axis
    (1% and 2% are as far apart as 10% and 20%) and a label per bar (kept count and percentage) tell the tensors
    apart. A dashed line marks the overall kept fraction; a tensor pruned entirely is drawn at the axis floor in red.
    Uses :class:`matplotlib.figure.Figure` directly (no pyplot state), so it is safe in scripts and servers.

    Args:
        rows: Per-tensor sparsity, as from :func:`~lightning_snip.report.sparsity_report`.
        title: The figure title. Defaults to ``"SNIP: kept weights per tensor"``.

    Returns:
        The figure.

    Raises:
        ImportError: If matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    fractions = [r.kept / r.total if r.total else 0.0 for r in rows]
    positive = [f for f in fractions if f > 0]
    floor = min([*positive, 1.0]) / 3
    fig = Figure(figsize=(min(4 + 0.45 * len(rows), 24), 5), layout="constrained")
    ax = fig.add_subplot()
    positions = list(range(len(rows)))
    heights = [f if f > 0 else floor for f in fractions]
    colors = ["tab:blue" if f > 0 else "tab:red" for f in fractions]
    bars = ax.bar(positions, heights, color=colors)
    labels = [f"{r.kept:,}\n{f:.2%}" if f > 0 else "0\ncollapsed" for r, f in zip(rows, fractions, strict=True)]
    ax.bar_label(bars, labels, fontsize=6, padding=2)
    ax.set_yscale("log")
    ax.set_ylim(floor / 1.5, 3.0)
    kept, total = sum(r.kept for r in rows), sum(r.total for r in rows)
    if total and kept:
        ax.axhline(kept / total, color="black", linestyle="--", label=f"overall: {kept / total:.2%} kept")
        ax.legend(loc="upper right", fontsize=8)
    ax.yaxis.set_major_formatter(lambda value, _: f"{value:.3g}".rstrip("0").rstrip(".") if value < 1 else "1")
    ax.set_xticks(positions, [f"{r.name}\n{tuple(r.shape)}" for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("fraction of weights kept (log scale)")
    ax.set_title(title)
    return fig


def width_bar_chart(widths: Mapping[str, tuple[int, int]], title: str = "SNIP: channels kept per layer") -> Figure:
    """Bars of each layer's dense width and, over them, the width it keeps, each labelled with the kept count.

    Args:
        widths: ``{layer: (dense width, kept width)}``, in network order.
        title: The figure title.

    Raises:
        ImportError: If matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    names = list(widths)
    fig = Figure(figsize=(min(4 + 0.45 * len(names), 24), 5), layout="constrained")
    ax = fig.add_subplot()
    positions = list(range(len(names)))
    ax.bar(positions, [widths[n][0] for n in names], color="lightgray", label="dense")
    bars = ax.bar(positions, [widths[n][1] for n in names], color="tab:blue", label="kept")
    ax.bar_label(bars, [str(widths[n][1]) for n in names], fontsize=6, padding=2)
    ax.set_xticks(positions, names, rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    ax.set_title(title)
    return fig
