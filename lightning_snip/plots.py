"""Pictures of masks. Needs matplotlib (``pip install matplotlib``); nothing else in the package does."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lightning_snip.masks import TensorSparsity

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def sparsity_bar_chart(rows: Sequence[TensorSparsity], title: str = "SNIP: sparsity per tensor") -> Figure:
    """A bar chart of each tensor's sparsity, in parameter order, with the overall sparsity as a line.

    Uses :class:`matplotlib.figure.Figure` directly (no pyplot state), so it is safe in scripts and servers.

    Args:
        rows: Per-tensor sparsity, as from :func:`~lightning_snip.masks.sparsity_report`.
        title: The figure title. Defaults to ``"SNIP: sparsity per tensor"``.

    Returns:
        The figure.

    Raises:
        ImportError: If matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(4 + 0.3 * len(rows), 24), 4.5), layout="constrained")
    ax = fig.add_subplot()
    positions = list(range(len(rows)))
    ax.bar(positions, [100 * r.sparsity for r in rows], color="tab:blue")
    kept, total = sum(r.kept for r in rows), sum(r.total for r in rows)
    ax.axhline(100 * (1 - kept / total) if total else 0.0, color="black", linestyle="--", label="overall")
    ax.set_xticks(positions, [f"{r.name}\n{tuple(r.shape)}" for r in rows], rotation=90, fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel("sparsity (%)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return fig
