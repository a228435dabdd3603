"""What the callback reports: the scoring summary, the sparsity chart, metrics, and the compressed weights file.

Lightning glue like ``callback.py``, kept apart from it. Every output here is an extra: a logger, a chart or a file
that fails only warns, and training goes on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from torch import Tensor, nn

from lightning_snip import _lightning as lightning
from lightning_snip.compress import save_compressed
from lightning_snip.report import TensorSparsity, format_report
from lightning_snip.sharding import is_dtensor

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from lightning_snip.pipeline import Shrunk

PLOT_FILE = "snip_sparsity.png"
WIDTHS_FILE = "snip_widths.png"
COMPRESSED_FILE = "snip_compressed.pt"
_matplotlib_hint_given = False


def log_metrics(metrics: dict[str, float], trainer: Trainer, step: int) -> None:
    """Send ``metrics`` to every logger of the trainer, on rank zero; a logger that fails only warns."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        try:
            logger.log_metrics(metrics, step=step)
        except Exception as error:  # an optional extra never stops training
            lightning.rank_zero_warn(
                trainer, f"`SNIPPruning`: {type(logger).__name__} could not log {sorted(metrics)[:3]}: {error!r}."
            )


OUTPUT_DIR = "snip_logs"
_RUN_DIRECTORY = "_snip_output_dir"


def output_directory(trainer: Trainer) -> Path:
    """Where the callback writes its chart and compressed weights for this trainer's run.

    With a logger: the logger's directory (``lightning_logs/version_<n>``), next to its metrics. Without one
    (``logger=False``): a fresh ``<default_root_dir>/snip_logs/version_<n>`` per trainer, so runs never overwrite
    each other's files. Every rank must call it (the logger's directory is a collective under DDP); only rank zero
    writes there.
    """
    log_dir = trainer.log_dir
    if trainer.loggers:
        return Path(log_dir or trainer.default_root_dir)
    chosen = getattr(trainer, _RUN_DIRECTORY, None)
    if isinstance(chosen, Path):
        return chosen
    base = Path(trainer.default_root_dir) / OUTPUT_DIR
    version = 0
    while (base / f"version_{version}").exists():
        version += 1
    chosen = base / f"version_{version}"
    setattr(trainer, _RUN_DIRECTORY, chosen)
    return chosen


def report_scoring(
    trainer: Trainer,
    label: str,
    dead: list[str],
    elapsed: float,
    rows: list[TensorSparsity],
    per_layer: bool,
    chart: bool,
) -> None:
    """Warn about dead and collapsed tensors, log the scoring metrics, save the chart, print the table.

    Args:
        trainer: The trainer.
        label: The criterion and scope, as shown (``"snip, global"``).
        dead: Tensors whose scores are all zero.
        elapsed: Scoring time in seconds.
        rows: Per-tensor sparsity.
        per_layer: Also log ``snip/sparsity/<tensor>``.
        chart: Save (and send to TensorBoard) the sparsity chart.
    """
    for name in dead:
        lightning.rank_zero_warn(
            trainer,
            f"`SNIPPruning`: every {label.split(',')[0]} score of `{name}` is zero (the loss does not depend on it at"
            " initialization); its mask is decided by tie-breaking alone. Exclude it or check the model.",
        )
    for row in rows:
        if row.kept == 0:
            lightning.rank_zero_warn(
                trainer,
                f"`SNIPPruning`: `{row.name}` {row.shape} is pruned entirely (layer collapse), so no signal passes"
                " through it. Lower `sparsity`, use `scope='layerwise'` or `min_density`, or `exclude` it.",
            )
    kept, total = sum(r.kept for r in rows), sum(r.total for r in rows)
    metrics = {
        "snip/sparsity": 1.0 - kept / total,
        "snip/kept_params": float(kept),
        "snip/total_params": float(total),
        "snip/scoring_time_s": elapsed,
    }
    if per_layer:
        metrics.update({f"snip/sparsity/{r.name}": r.sparsity for r in rows})
    log_metrics(metrics, trainer, trainer.global_step)
    plotted = ""
    if chart:
        directory = output_directory(trainer)  # a collective under DDP: every rank asks
        if trainer.is_global_zero:
            path = plot(trainer, rows, directory, f"SNIP ({label}): kept weights per tensor")
            plotted = f"; sparsity chart: {path}" if path is not None else ""
    lightning.rank_zero_info(
        trainer,
        f"SNIPPruning ({label}) kept {kept:,} of {total:,} weights ({1 - kept / total:.2%} sparsity), scored in"
        f" {elapsed:.2f}s{plotted}\n{format_report(rows)}",
    )


def plot(trainer: Trainer, rows: list[TensorSparsity], directory: Path, title: str) -> Path | None:
    """Save the bar chart (and send it to TensorBoard); an optional extra, so a failure only warns."""

    def figure() -> Any:
        from lightning_snip.plots import sparsity_bar_chart

        return sparsity_bar_chart(rows, title=title)

    return _save_figure(trainer, figure, directory / PLOT_FILE, "snip/sparsity_per_tensor")


def _save_figure(trainer: Trainer, make: Callable[[], Any], path: Path, tag: str) -> Path | None:
    """Save a chart to ``path`` and send it to TensorBoard under ``tag``; a failure only warns."""
    global _matplotlib_hint_given
    directory = path.parent
    try:
        figure = make()
    except ImportError:
        if not _matplotlib_hint_given:
            _matplotlib_hint_given = True
            lightning.rank_zero_info(trainer, "`SNIPPruning`: `pip install matplotlib` to get a sparsity chart.")
        return None
    saved: Path | None = path
    try:
        directory.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
    except Exception as error:  # an optional extra never stops training
        lightning.rank_zero_warn(
            trainer, f"`SNIPPruning`: the sparsity chart could not be saved to {path} ({error!r}); training goes on"
        )
        saved = None
    tensorboard = lightning.namespace(trainer).loggers.TensorBoardLogger
    for logger in trainer.loggers:
        if isinstance(logger, tensorboard):
            try:
                logger.experiment.add_figure(tag, figure, global_step=trainer.global_step)
            except Exception as error:
                lightning.rank_zero_warn(
                    trainer, f"`SNIPPruning`: the sparsity chart could not go to TensorBoard ({error!r})."
                )
    return saved


def write_compressed(trainer: Trainer) -> None:
    """Write the trained weights compressed next to the logs; an optional extra, so a failure only warns."""
    state = trainer.strategy.lightning_module_state_dict()  # a collective on sharded strategies
    if any(is_dtensor(v) for v in state.values()):  # `fully_shard` shards: gathered whole on rank zero
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(cast(nn.Module, trainer.strategy.model), options=options)
    directory = output_directory(trainer)  # a collective under DDP: every rank asks
    path, size, failure = directory / COMPRESSED_FILE, 0, None
    if trainer.is_global_zero:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            size = save_compressed(state, path)
        except Exception as error:
            failure = error
    trainer.strategy.barrier("snip_compressed")  # every rank leaves once the file is there
    if not trainer.is_global_zero:
        return
    if failure is not None:
        lightning.rank_zero_warn(
            trainer, f"`SNIPPruning`: the compressed weights could not be written to {path} ({failure!r})."
        )
        return
    dense = sum(v.nbytes for v in state.values() if isinstance(v, Tensor))
    ratio = dense / size if size else 0.0
    log_metrics({"snip/compressed_bytes": float(size), "snip/compression_ratio": ratio}, trainer, trainer.global_step)
    lightning.rank_zero_info(
        trainer,
        f"SNIPPruning: compressed weights written to {path}: {size / 1e6:.2f} MB, {ratio:.1f}x smaller than the"
        f" dense tensors ({dense / 1e6:.2f} MB). Load with `lightning_snip.load_compressed(path)`.",
    )


def report_restored(trainer: Trainer, differing: list[str], kept: int, total: int) -> None:
    """Say that masks were restored from a checkpoint, not scored, and warn about the options that differ."""
    if differing:
        lightning.rank_zero_warn(
            trainer,
            "`SNIPPruning`: the checkpoint's masks are restored as they are, although this instance's options"
            f" differ: {', '.join(differing)}. Options only shape scoring, and a resumed run does not score; to"
            " prune with the new options, start a fresh fit without `ckpt_path`.",
        )
    lightning.rank_zero_info(
        trainer,
        f"SNIPPruning: masks restored from the checkpoint, not scored again: {kept:,} of {total:,} weights"
        f" kept ({1 - kept / max(total, 1):.2%} sparsity).",
    )


def warn_pruned_writes(trainer: Trainer, when: str, counts: dict[str, int], per_rank: bool) -> None:
    """Warn that something besides the optimizer step wrote to pruned weights (``counts`` of them, by name)."""
    found = ", ".join(f"{count:,} in `{name}`" for name, count in counts.items())
    message = (
        f"`SNIPPruning`: pruned weights were non-zero {when} ({found}): something besides the optimizer step wrote"
        " to them (a callback, `training_step`, or a backward outside `manual_backward`). They are zero again, and"
        " from now on they are re-zeroed after every optimizer step."
    )
    if per_rank:  # each rank checks its own shards
        warnings.warn(f"[rank {trainer.global_rank}] {message}", stacklevel=3)
    else:
        lightning.rank_zero_warn(trainer, message)


def report_channels(trainer: Trainer, label: str, shrunk: Shrunk, chart: bool) -> None:
    """Log and print what removing channels gained: parameters and MACs before and after, each layer's width.

    Logged at step 0: ``snip/params_before``, ``snip/params_after``, ``snip/macs_before``, ``snip/macs_after``,
    ``snip/channels_kept``, ``snip/channels_total`` and ``snip/scoring_time_s``. The chart of widths per layer (dense
    against kept) is saved as ``snip_widths.png`` in :func:`output_directory`.
    """
    (params_before, macs_before), (params_after, macs_after) = shrunk.before, shrunk.after
    kept = sum(k for _, k in shrunk.widths.values())
    total = sum(d for d, _ in shrunk.widths.values())
    log_metrics(
        {
            "snip/params_before": float(params_before),
            "snip/params_after": float(params_after),
            "snip/macs_before": float(macs_before),
            "snip/macs_after": float(macs_after),
            "snip/channels_kept": float(kept),
            "snip/channels_total": float(total),
            "snip/scoring_time_s": shrunk.seconds,
        },
        trainer,
        trainer.global_step,
    )
    plotted = ""
    if chart:
        directory = output_directory(trainer)  # a collective under DDP: every rank asks
        if trainer.is_global_zero:

            def figure() -> Any:
                from lightning_snip.plots import width_bar_chart

                return width_bar_chart(shrunk.widths, title=f"SNIP ({label}): channels kept per layer")

            path = _save_figure(trainer, figure, directory / WIDTHS_FILE, "snip/channels_per_layer")
            plotted = f"; width chart: {path}" if path is not None else ""
    width = max([len(n) for n in shrunk.widths] + [5])
    table = "\n".join(f"  {name:<{width}}  {d:>6} -> {k:>6}" for name, (d, k) in shrunk.widths.items())
    lightning.rank_zero_info(
        trainer,
        f"SNIPPruning ({label}, channels) kept {kept:,} of {total:,} channels: parameters {params_before:,} ->"
        f" {params_after:,} ({params_after / max(params_before, 1):.2f}x), MACs {macs_before:,} -> {macs_after:,}"
        f" ({macs_after / max(macs_before, 1):.2f}x), in {shrunk.seconds:.2f}s{plotted}\n  {'layer':<{width}}"
        f"   dense ->   kept\n{table}",
    )
