"""Train a smaller network: channel SNIP against dense and unstructured SNIP on full Fashion-MNIST, with wall time.

For each network (LeNet-5-Caffe and a small ResNet, `resnet8`) and seed, from the same initialization:

- dense;
- `SNIPPruning(structure="channel", scope="layerwise")` removing 50% of the prunable channels, scored by snip,
  synflow, magnitude and random (layerwise: every criterion gets the same widths, so they differ only in which
  channels they keep);
- unstructured SNIP (`structure="weight"`) at the sparsity that leaves the same number of parameters as the
  channel runs (the parameters the channel runs remove, as a fraction of the candidate weights).

With `--arms`, the widths study instead: what a channel criterion decides when the widths are its own.
`channel-snip-global` and `channel-synflow-global` rank channels across the network (`scope="global"`) and remove them
until no more parameters are left than the layerwise `channel-snip` run trains (`sparsity_of="parameters"`), so
they compare with uniform widths at equal size; `channel-snip-global-macs` until no more weight MACs are left
(`sparsity_of="macs"`), at equal compute; `channel-snip-global-macs-floor` the same with `min_density=0.25` (every
layer keeps at least a quarter of its channels).

Each run records the test error, the parameters it trains, and the wall time of `trainer.fit` (scoring and shrinking
included) as the user's clock sees it. Writes `results.json`, `results.md` and `error_vs_time.png` to `--out`.

    python examples/structured_study.py --quick           # a smoke run: 20 batches an epoch, 1 epoch
    python examples/structured_study.py --out examples/results/structured-fashion-mnist   # the committed table
    python examples/structured_study.py --out examples/results/structured-fashion-mnist --resume
    python examples/structured_study.py --arms dense channel-snip channel-snip-global --out results/widths
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl
import torch
from classifier import ImageClassifier
from datamodules import SYSTEM_FASHION_DIR, FashionMNISTDataModule
from models import Arch
from torch import nn

from lightning_snip import SNIPPruning, find_candidates
from lightning_snip.scoring import CriterionName
from lightning_snip.structured import SizeCounter, trace_channel_groups

ARCHS = {"lenet5": "LeNet-5-Caffe", "resnet8": "ResNet-8", "resnet8w2": "ResNet-8, 2x wide"}
EPOCHS = {"lenet5": 4, "resnet8": 4, "resnet8w2": 4}
LR = {"lenet5": 0.05, "resnet8": 0.05, "resnet8w2": 0.05}
CHANNEL_CRITERIA = ["snip", "synflow", "magnitude", "random"]
CHANNEL_SPARSITY = 0.5
ARMS = ["dense", *[f"channel-{c}" for c in CHANNEL_CRITERIA], "weight-snip"]
# the criterion's own widths (`scope="global"`), at most the parameters (or the weight MACs) of `channel-snip`
GLOBAL_ARMS = [
    "channel-snip-global",
    "channel-synflow-global",
    "channel-snip-global-macs",
    "channel-snip-global-macs-floor",
]
FLOOR = 0.25  # `min_density` of the `-floor` arm: every layer keeps at least this share of its channels

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what `platform` knows).

    Wall times compare only on one CPU, so every run records it.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _run(
    arch: str, seed: int, epochs: int, limit: int | None, pruning: SNIPPruning | None, data_args: dict[str, Any]
) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    model = ImageClassifier(arch=cast(Arch, arch), lr=LR[arch], lr_milestones=[max(1, epochs - 1)])
    data = FashionMNISTDataModule(batch_size=100, **data_args)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=limit,
        limit_val_batches=0,
        callbacks=[pruning] if pruning is not None else [],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    error = float(trainer.test(model, datamodule=data, verbose=False)[0]["test_error"])
    kept = sum(p.numel() for p in model.parameters())
    if pruning is not None and pruning.structure == "weight":
        kept -= sum(int((~m).sum()) for m in pruning.masks.values())
    widths = [m.weight.shape[0] for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return {
        "error": error,
        "params": kept,
        "train_s": seconds,
        "source": data.source,
        "cpu": cpu_model(),
        "widths": widths,
    }


def _layerwise_run(results: dict[str, Any], arch: str, arm: str) -> dict[str, Any]:
    """The last layerwise `channel-snip` run of ``arch``: what ``arm`` is matched to."""
    channel = [r for r in results["runs"] if r["arch"] == arch and r["arm"] == "channel-snip"]
    if not channel:
        raise SystemExit(f"`{arm}` is matched to the size of `channel-snip`: put `channel-snip` before it in --arms.")
    return channel[-1]


def _matched(results: dict[str, Any], arch: str, arm: str) -> int:
    """The parameters the layerwise `channel-snip` run of ``arch`` trains."""
    return int(_layerwise_run(results, arch, arm)["params"])


@functools.cache
def _example(arch: str) -> tuple[Any, Any, SizeCounter]:
    """``arch`` as built, its channel groups, and their size counter on one 28x28 image."""
    model = ImageClassifier(arch=cast(Arch, arch))
    x = torch.zeros(1, 1, 28, 28)
    graph, groups = trace_channel_groups(model, x, find_candidates(model))
    return model, groups, SizeCounter(model, graph, groups, x)


def weight_macs(arch: str, widths: list[int] | None = None) -> int:
    """Weight MACs per image of ``arch`` with its convolutions and linear layers at ``widths`` (in the order the model
    holds them, as runs record them; ``None``: dense). Only the widths matter, not which channels were kept."""
    model, groups, counter = _example(arch)
    if widths is None:
        return int(counter.dense_macs)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    width = dict(zip(names, widths, strict=True))
    return int(counter.macs({g.name: torch.arange(g.size) < width[g.name] for g in groups}))


def _global_arm(arm: str) -> tuple[str, bool, float]:
    """A global arm's name read once: its criterion, whether it is matched by weight MACs (else by parameters), and
    its `min_density`."""
    return arm.removeprefix("channel-").split("-global")[0], "-macs" in arm, FLOOR if arm.endswith("-floor") else 0.0


def budget(arm: str) -> str:
    """What a global arm is matched to, in words: equal parameters or equal weight MACs, and its floor if any."""
    _, by_macs, floor = _global_arm(arm)
    return f"equal {'weight MACs' if by_macs else 'parameters'}" + (f" (min_density {floor:g})" if floor else "")


def _pruning(arm: str, results: dict[str, Any], arch: str) -> SNIPPruning | None:
    """The callback an arm trains with (``None``: dense)."""
    model, _, counter = _example(arch)
    dense_params = counter.dense_parameters
    if arm in GLOBAL_ARMS:  # the criterion's own widths, at most the size of the layerwise channel run
        criterion, by_macs, floor = _global_arm(arm)
        if by_macs:
            sparsity = 1.0 - weight_macs(arch, _layerwise_run(results, arch, arm)["widths"]) / weight_macs(arch)
        else:
            sparsity = 1.0 - _matched(results, arch, arm) / dense_params
        return SNIPPruning(
            sparsity=sparsity,
            structure="channel",
            scope="global",
            sparsity_of="macs" if by_macs else "parameters",
            min_density=floor,
            criterion=cast(CriterionName, criterion),
            plot=False,
            log_per_layer=False,
        )
    if arm.startswith("channel-"):
        return SNIPPruning(
            sparsity=CHANNEL_SPARSITY,
            structure="channel",
            scope="layerwise",
            criterion=cast(CriterionName, arm.removeprefix("channel-")),
            plot=False,
            log_per_layer=False,
        )
    if arm == "weight-snip":  # the parameters the channel runs train, as a share of the candidates
        candidates = sum(p.numel() for p in find_candidates(model).values())
        removed = dense_params - _matched(results, arch, arm)
        return SNIPPruning(sparsity=removed / candidates, plot=False, log_per_layer=False)
    return None


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    path = args.out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if args.resume and path.exists() else {"runs": []}
    done = {(r["arch"], r["arm"], r["seed"]) for r in results["runs"]}
    for arch in args.archs:
        epochs = 1 if args.quick else EPOCHS[arch]
        limit = 20 if args.quick else None
        for seed in range(args.seeds):
            for arm in args.arms:
                if (arch, arm, seed) in done:
                    continue
                pruning = _pruning(arm, results, arch)
                data_args = {"data_dir": args.data_dir, "system_dir": args.system_dir, "val_size": args.val_size}
                run = _run(arch, seed, epochs, limit, pruning, data_args)
                run.update(arch=arch, arm=arm, seed=seed, epochs=epochs)
                results["runs"].append(run)
                args.out.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(results, indent=2) + "\n")  # after every run: `--resume` goes on from here
                print(
                    f"{ARCHS[arch]} {arm} seed {seed}: {run['error']:.2%} error, {run['params']:,} parameters,"
                    f" {run['train_s']:.0f} s",
                    flush=True,
                )
    return results


DIVERGED = 0.85  # a test error this high (chance is 90%) means the run diverged: counted, not averaged


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per network and arm: mean and spread of the test error over the seeds whose run trained, how many diverged,
    and the mean wall time (of every run) with its ratio to dense."""
    rows = []
    for arch in ARCHS:
        runs = [r for r in results["runs"] if r["arch"] == arch]
        if not runs:
            continue
        dense_s = statistics.mean(r["train_s"] for r in runs if r["arm"] == "dense")
        dense_errors = [r["error"] for r in runs if r["arm"] == "dense" and r["error"] < DIVERGED]
        dense_error = statistics.mean(dense_errors) if dense_errors else float("nan")
        for arm in [*ARMS, *GLOBAL_ARMS]:
            mine = [r for r in runs if r["arm"] == arm]
            if not mine:
                continue
            trained = [r["error"] for r in mine if r["error"] < DIVERGED]
            error = statistics.mean(trained) if trained else float("nan")
            seconds = statistics.mean(r["train_s"] for r in mine)
            rows.append(
                {
                    "arch": arch,
                    "arm": arm,
                    "seeds": len(mine),
                    "diverged": len(mine) - len(trained),
                    "error": error,
                    "error_std": statistics.stdev(trained) if len(trained) > 1 else 0.0,
                    "vs_dense": error - dense_error,
                    "params": mine[0]["params"],
                    "train_s": seconds,
                    "speedup": dense_s / seconds,
                    "epochs": mine[0]["epochs"],
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]], source: str) -> str:
    lines = [
        f"Data: {source}. Test error: mean ± standard deviation over the seeds whose run trained (a run ending at"
        f" {DIVERGED:.0%} error or more diverged and is counted apart); wall time of `trainer.fit` on this machine's"
        " CPU, mean over all seeds.",
        "",
        "| network | run | seeds | diverged | test error | vs dense | parameters | training time | faster than dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {ARCHS[r['arch']]} ({r['epochs']} epochs) | {r['arm']} | {r['seeds']} | {r['diverged']} |"
            f" {r['error']:.2%} ± {100 * r['error_std']:.2f} | {100 * r['vs_dense']:+.2f} pt | {r['params']:,} |"
            f" {r['train_s']:.0f} s | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def machines(results: dict[str, Any]) -> str:
    """Which CPU each network's runs trained on: wall times and their ratios compare only within one CPU, so a network
    whose runs came from more than one is flagged."""
    lines = []
    for arch, name in ARCHS.items():
        cpus = sorted({r.get("cpu", "not recorded") for r in results["runs"] if r["arch"] == arch})
        if cpus:
            mixed = " (mixed: its wall times do not compare)" if len(cpus) > 1 else ""
            lines.append(f"- {name}: {', '.join(cpus)}{mixed}")
    return "CPU of every run, per network:\n\n" + "\n".join(lines) + "\n"


def paired(
    results: dict[str, Any], against: str = "channel-random", arm: str = "channel-snip", at: str = "at the same widths"
) -> str:
    """Seed by seed, ``against``'s test error minus ``arm``'s, in points: every arm of a seed starts from the same
    initialization, so the pair differs only in the channels kept (positive: ``arm`` is better). Seeds where either
    run diverged are left out; an empty string where no seed has both."""
    lines = [
        f"Paired by seed, {at}: {against}'s test error minus {arm}'s, in points (positive: {arm} is better).",
        "",
        f"| network | seeds | per seed | mean | {arm} better in |",
        "|---|---|---|---|---|",
    ]
    for arch in ARCHS:
        errors = {
            (r["arm"], r["seed"]): r["error"]
            for r in results["runs"]
            if r["arch"] == arch and r["arm"] in (arm, against) and r["error"] < DIVERGED
        }
        seeds = sorted({s for a, s in errors if (arm, s) in errors and (against, s) in errors})
        if not seeds:
            continue
        diffs = [100 * (errors[(against, s)] - errors[(arm, s)]) for s in seeds]
        per_seed = ", ".join(f"{d:+.2f}" for d in diffs)
        lines.append(
            f"| {ARCHS[arch]} | {len(seeds)} | {per_seed} | {statistics.mean(diffs):+.2f} |"
            f" {sum(d > 0 for d in diffs)} of {len(seeds)} |"
        )
    return "\n".join(lines) + "\n" if len(lines) > 4 else ""


def widths(results: dict[str, Any]) -> str:
    """Each convolution's and linear layer's output width, in the model's order, for every channel arm of seed 0 whose
    widths were recorded (the dense widths first); an empty string where none were."""
    lines = []
    for arch, name in ARCHS.items():
        runs = {
            r["arm"]: r["widths"] for r in results["runs"] if r["arch"] == arch and r["seed"] == 0 and "widths" in r
        }
        for arm in [a for a in [*ARMS, *GLOBAL_ARMS] if a in runs and (a == "dense" or a.startswith("channel-"))]:
            macs = weight_macs(arch, runs[arm])
            lines.append(
                f"| {name} | {arm} | {macs:,} ({macs / weight_macs(arch):.2f}x) | {', '.join(map(str, runs[arm]))} |"
            )
    if not lines:
        return ""
    header = [
        "Weight MACs per image (every convolution's and linear layer's weights times the positions it is applied at)"
        " and output widths of the convolutions and linear layers, in order (seed 0):",
        "",
        "| network | run | weight MACs | widths |",
    ]
    return "\n".join([*header, "|---|---|---|---|", *lines]) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Test error against training wall time, one panel per network; one legend below the panels."""
    from matplotlib.figure import Figure

    archs = [a for a in ARCHS if any(r["arch"] == a for r in rows)]
    fig = Figure(figsize=(4.5 * len(archs), 4.6), layout="constrained")
    axes = fig.subplots(1, len(archs), squeeze=False)[0]
    styles: dict[str, tuple[str, str]] = {}
    for ax, arch in zip(axes, archs, strict=True):
        for r in [r for r in rows if r["arch"] == arch]:
            marker = "s" if r["arm"] == "dense" else "o" if r["arm"].startswith("channel") else "^"
            color = styles.setdefault(r["arm"], (marker, f"C{len(styles)}"))[1]
            ax.scatter(r["train_s"], 100 * r["error"], marker=marker, s=45, color=color, label=r["arm"])
        mine = [r for r in rows if r["arch"] == arch]
        ax.set_xlim(0, max(r["train_s"] for r in mine) * 1.1)
        ax.set_xlabel("training wall time, scoring included (s)")
        ax.set_ylabel("test error (%)")
        ax.set_title(ARCHS[arch])
        ax.grid(True, alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(
        handles=list(handles.values()), labels=list(handles), loc="outside lower center", ncol=min(len(handles), 6)
    )
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument(
        "--arms",
        nargs="+",
        default=ARMS,
        choices=[*ARMS, *GLOBAL_ARMS],
        help="runs per network and seed, in this order (default: the main table's)",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="20 batches of one epoch per run: a smoke run")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out's results.json")
    parser.add_argument("--data-dir", default="data", help="where torchvision's FashionMNIST/raw files are")
    parser.add_argument("--system-dir", default=SYSTEM_FASHION_DIR, help="where Debian's package puts the files")
    parser.add_argument("--val-size", type=int, default=5000, help="training images held out (not used here)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path("results/structured-quick" if args.quick else "results/structured-fashion-mnist")
    results = run_study(args)
    rows = summarize(results)
    source = results["runs"][0]["source"] if results["runs"] else ""
    pairs = [
        paired(results),
        *(
            paired(results, "channel-snip", arm, f"at {budget(arm)}, uniform widths against the criterion's own")
            for arm in GLOBAL_ARMS
        ),
    ]
    sections = [machines(results), *pairs, widths(results)]
    table = markdown(rows, source) + "".join(f"\n{section}" for section in sections if section)
    (args.out / "results.md").write_text(table)
    plot(rows, args.out / "error_vs_time.png")
    print(table)
    print(f"Written to {args.out}")
    return results


if __name__ == "__main__":
    main()
