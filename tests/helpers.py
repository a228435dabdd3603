"""Shared test models, data and the one fit helper."""

from __future__ import annotations

import glob
import tempfile
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_snip import SNIPPruning


def reference_top_k(scores: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    """The selection rule by a stable sort of all scores (as float32): the ``keep`` highest, ties to the earlier
    position (tensor order, then row-major)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[order] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = kept[start : start + s.numel()].view(s.shape)
        start += s.numel()
    return masks


def make_data(
    n: int = 64, features: int = 16, classes: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32
) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g).to(dtype)
    return TensorDataset(x, torch.randint(0, classes, (n,), generator=g))


class FixedOrder(Sampler[int]):
    """Yields the given indices in the given order."""

    def __init__(self, order: list[int]) -> None:
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class BoringClassifier(pl.LightningModule):
    """A small Sequential classifier; optimizer chosen by name."""

    def __init__(
        self, optimizer: str = "sgd", features: int = 16, classes: int = 4, dropout: float = 0.1, **opt_kwargs: Any
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, classes)
        )
        self.optimizer_name = optimizer
        self.opt_kwargs = opt_kwargs or {"lr": 0.1}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cls = {
            "sgd": torch.optim.SGD,
            "adam": torch.optim.Adam,
            "adamw": torch.optim.AdamW,
            "rmsprop": torch.optim.RMSprop,
        }[self.optimizer_name]
        return cls(self.parameters(), **self.opt_kwargs)


class ZeroInvariantChecker(pl.Callback):
    """Records, after every training batch and at fit end, how many pruned weights are non-zero."""

    def __init__(self, pruning: SNIPPruning) -> None:
        self.pruning = pruning
        self.violations: list[int] = []
        self.batches = 0

    def _count(self, pl_module: pl.LightningModule) -> int:
        params = dict(pl_module.named_parameters())
        return sum(int((params[n][~m.to(params[n].device)] != 0).sum()) for n, m in self.pruning.masks.items())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        self.violations.append(self._count(pl_module))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.violations.append(self._count(pl_module))


def fit(
    model: pl.LightningModule,
    callbacks: list[pl.Callback],
    data: Any = None,
    *,
    batch_size: int = 16,
    ckpt_path: str | None = None,
    val_data: Any = None,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """Fit quietly on CPU: no logger, no progress bar, no checkpointing unless asked; validate on ``val_data``."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tempfile.mkdtemp(prefix="snip-test-"),  # where the sparsity plot goes
    }
    options.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    loader = data if data is not None else DataLoader(make_data(), batch_size=batch_size)
    trainer.fit(model, loader, val_data, ckpt_path=ckpt_path)
    return trainer


def _set_rank_environment(rank: int, world_size: int, port: int) -> None:
    """What a launcher would set: Lightning then sees LOCAL_RANK and joins instead of launching processes."""
    import os

    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size),
            "NODE_RANK": "0",
            "LOCAL_RANK": str(rank),
            "GLOBAL_RANK": str(rank),
        }
    )


RECORDED_GRADIENTS: dict[str, torch.Tensor] = {}


def register_recording_snip() -> str:
    """Register (once per process) SNIP that also records the mean gradients it scored with; return its name."""
    from lightning_snip import Criterion, available_criteria, register_criterion

    if "snip_recorded" not in available_criteria():

        @register_criterion("snip_recorded")
        class RecordedSNIP(Criterion):
            needs_data = True

            def score(self, context):
                grads = context.mean_gradients()
                RECORDED_GRADIENTS.update({n: g.detach().clone() for n, g in grads.items()})
                return {n: (g * context.weights[n].detach()).abs() for n, g in grads.items()}

    return "snip_recorded"


def union_mean_gradients(order: list[int], batch_size: int = 4) -> dict[str, torch.Tensor]:
    """The reference: the loss gradient of BoringClassifier (seed 0, float64, train mode, no dropout) on each batch of
    ``make_data(32)`` taken in ``order``, averaged over the batches with plain autograd."""
    torch.manual_seed(0)
    model = BoringClassifier(dropout=0.0).double().train()
    x, y = make_data(32).tensors
    weights = [model.net[0].weight, model.net[4].weight]
    total = [torch.zeros_like(w) for w in weights]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in batches:
        loss = nn.functional.cross_entropy(model(x[batch].double()), y[batch])
        for t, g in zip(total, torch.autograd.grad(loss, weights), strict=True):
            t += g
    return {"net.0.weight": total[0] / len(batches), "net.4.weight": total[1] / len(batches)}


def ddp_rank_main(rank: int, world_size: int, port: int, out_dir: str, criterion: str, scope: str = "global") -> None:
    """One DDP rank, launched by the test itself (Lightning sees LOCAL_RANK and does not launch)."""

    _set_rank_environment(rank, world_size, port)
    # every rank seeded differently: DDP broadcasts rank 0's weights, the callback must share the random seed
    torch.manual_seed(rank)
    model = BoringClassifier(dropout=0.0, optimizer="adam", lr=0.05)
    criterion = register_recording_snip() if criterion == "snip" else criterion
    iterations = 2 if criterion == "iterative_snip" else None  # two rounds of two fresh batches per rank
    pruning = SNIPPruning(
        sparsity=0.5 if scope == "2:4" else 0.8, num_batches=2, criterion=criterion, scope=scope, iterations=iterations
    )
    checker = ZeroInvariantChecker(pruning)
    loader = DataLoader(make_data(32), batch_size=4)  # Lightning adds a DistributedSampler: 4 batches per rank
    fit(model, [pruning, checker], loader, strategy="ddp", devices=world_size, precision="64-true", max_epochs=2)
    torch.save(
        {
            "masks": pruning.masks,
            "violations": checker.violations,
            "weights": {k: v.detach().clone() for k, v in model.named_parameters()},
            "gradients": dict(RECORDED_GRADIENTS),
        },
        f"{out_dir}/rank{rank}.pt",
    )
    leave_together()


def sharded_scores(seed: int = 0) -> dict[str, torch.Tensor]:
    """Scores with many ties (few distinct values), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randint(0, 5, shape, generator=g).float()
        for name, shape in (("a", (17, 9)), ("b", (40,)), ("c", (3, 4, 5)), ("d", (2,)))
    }


def shard_bounds(numel: int, world_size: int, seed: int) -> list[int]:
    """Uneven, possibly empty, contiguous slices: cut points [0, ..., numel]."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randint(0, numel + 1, (world_size - 1,), generator=g).tolist())
    if seed % 2:
        cuts[0] = 0  # rank 0 holds nothing of every other tensor
    return [0, *cuts, numel]


def distributed_selection_rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    import lightning_snip.selection as masks_module

    masks_module._CHUNK = 8  # cross chunk boundaries inside every slice
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        full = sharded_scores()
        local = {}
        for i, (name, scores) in enumerate(full.items()):
            bounds = shard_bounds(scores.numel(), world_size, seed=i)
            local[name] = scores.reshape(-1)[bounds[rank] : bounds[rank + 1]]
        numels = {name: s.numel() for name, s in full.items()}
        result = {
            f"{scope}-{sparsity}": masks_module.select_masks_distributed(local, numels, sparsity, scope)
            for scope in ("global", "layerwise")
            for sparsity in (0.0, 0.3, 0.75, 0.95)
        }
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_and_wait(fn: Any, args: tuple, nprocs: int, timeout_s: float = 240) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes; fail (not hang) if they outlive ``timeout_s``."""
    import time

    import pytest
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {timeout_s} s: a collective is missing on some rank")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave_together() -> None:
    """Wait for every rank, then destroy the process group: a group left to interpreter exit can abort the process
    ("terminate called without an active exception") when gloo's threads are torn down after the work is done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class LeavesTogether:
    """A strategy mixin: ``ddp_spawn`` workers leave through :func:`leave_together` when the strategy tears down."""

    def teardown(self) -> None:
        super().teardown()  # type: ignore[misc]
        leave_together()


class SpawnDDP(LeavesTogether, DDPStrategy):
    """Lightning's ``ddp_spawn`` whose workers leave together (changes nothing else)."""

    def __init__(self) -> None:
        super().__init__(start_method="spawn")


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy``, run on CPU with gloo for tests.

    torch's FSDP runs on CPU once told ``device_id=cpu``; Lightning accepts FSDP only with CUDA and passes no device
    there, so this subclass wraps the model itself with the same settings, auto-wrapping every ``nn.Linear``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), **kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


class FullyShardedClassifier(BoringClassifier):
    """``BoringClassifier`` sharded with ``fully_shard`` (FSDP2) for ``ModelParallelStrategy``: each Linear, then the
    whole network."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.net:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class LocalZeroChecker(pl.Callback):
    """Counts, after every training batch, the pruned entries of this rank's shards that are not zero, in the
    weights and in Adam's moments (which stay zero only if the gradients were masked)."""

    def __init__(self, pruning: SNIPPruning) -> None:
        self.pruning = pruning
        self.violations: list[int] = []
        self.grads_at_train_start = -1

    def on_train_start(self, trainer, pl_module) -> None:
        from lightning_snip.sharding import _fsdp1_flat_params

        tensors = [*pl_module.parameters(), *_fsdp1_flat_params(pl_module)]
        self.grads_at_train_start = sum(t.grad is not None for t in tensors)  # scoring leaves none behind

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from lightning_snip.sharding import local_tensor

        params, kept = self.pruning._params, self.pruning._kept
        states = trainer.optimizers[0].state
        tensors = [(params[n], m) for n, m in kept.items()]
        tensors += [(states[params[n]][key], m) for n, m in kept.items() for key in ("exp_avg", "exp_avg_sq")]
        self.violations.append(sum(int((local_tensor(t)[~m] != 0).sum()) for t, m in tensors))


class PrunedWriter(pl.Callback):
    """At the end of every training epoch (before the checkpoint is saved), sets this rank's pruned weights to 1."""

    def __init__(self, pruning: SNIPPruning) -> None:
        self.pruning = pruning

    @torch.no_grad()
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        from lightning_snip.sharding import local_tensor

        for name, kept in self.pruning._kept.items():
            local_tensor(self.pruning._params[name]).masked_fill_(~kept, 1.0)


def sharded_rank_main(rank: int, world_size: int, port: int, out_dir: str, strategy: str, criterion: str) -> None:
    """One rank of a sharded run: fit with a checkpoint, then resume from it with a fresh callback."""

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.strategies import ModelParallelStrategy

    _set_rank_environment(rank, world_size, port)

    def run(
        pruning: SNIPPruning, epochs: int, ckpt_path: str | None = None, logged: bool = True, write: bool = False
    ) -> list[int]:
        torch.manual_seed(0)  # identical init on every rank, and equal to the single-process reference
        if strategy == "fsdp":
            model: BoringClassifier = BoringClassifier(dropout=0.0, optimizer="adam", lr=0.05).double()
            chosen: Any = CPUFSDPStrategy()
        else:
            model = FullyShardedClassifier(dropout=0.0, optimizer="adam", lr=0.05).double()
            chosen = ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1)
        checker = LocalZeroChecker(pruning)
        checkpoint = ModelCheckpoint(dirpath=f"{out_dir}/ckpt", save_last=True)
        writers = [PrunedWriter(pruning)] if write else []
        fit(
            model,
            [pruning, checker, *writers, checkpoint],
            DataLoader(make_data(32, dtype=torch.float64), batch_size=4),  # with a DistributedSampler: 4 per rank
            strategy=chosen,
            devices=world_size,  # float64 throughout (FSDP's precision plugin has no '64-true')
            max_epochs=epochs,
            ckpt_path=ckpt_path,
            enable_checkpointing=True,
            logger=CSVLogger(out_dir, name="logs", version=0) if logged else False,
            log_every_n_steps=1,
        )
        assert checker.grads_at_train_start == 0
        return checker.violations

    criterion = register_recording_snip() if criterion == "snip" else criterion
    first = SNIPPruning(sparsity=0.8, num_batches=2, criterion=criterion, seed=7)
    # the pruned weights written to after the last step: the checkpoint's state dict, gathered before the callback's
    # `on_save_checkpoint` (FSDP's whole tensors; DTensors under `fully_shard`), must still hold them as zeros
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        violations = run(first, epochs=1, write=True)
    assert any("non-zero" in str(w.message) for w in caught), "the writes to pruned weights were not reported"
    saved_pruned_nonzero = -1  # `fully_shard` writes a distributed checkpoint (a folder of DTensor shards)
    if strategy == "fsdp":  # the epoch's checkpoint: `last.ckpt` is written after it, from weights zeroed again
        saved = torch.load(glob.glob(f"{out_dir}/ckpt/epoch=0-*.ckpt")[0], weights_only=False)["state_dict"]
        saved_pruned_nonzero = sum(int(saved[n][~m].count_nonzero()) for n, m in first.masks.items())
    # this rank's slice of each mean gradient, with where it starts in the whole weight's flattening
    gradients = {n: (first._shards[n].start, g.reshape(-1)) for n, g in RECORDED_GRADIENTS.items()}
    resumed = SNIPPruning(sparsity=0.8, num_batches=2, criterion=criterion, seed=7, save_compressed=True)

    def no_scoring(*args: Any) -> None:
        raise AssertionError("the resumed run scored again")

    resumed._score = no_scoring  # type: ignore[method-assign]
    resumed_violations = run(resumed, epochs=2, ckpt_path=f"{out_dir}/ckpt/last.ckpt")
    torch.save(
        {
            "masks": first.masks,
            "resumed_masks": resumed.masks,
            "violations": violations,
            "resumed_violations": resumed_violations,
            "state": first.state_dict(),
            "gradients": gradients,
            "saved_pruned_nonzero": saved_pruned_nonzero,
        },
        f"{out_dir}/rank{rank}.pt",
    )
    leave_together()


def sharding_rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Exercise the layout functions of ``lightning_snip.sharding`` on plain gloo processes; save what they return."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_snip.sharding import ShardingError, gather_packed_mask, shard_layout, whole_shapes

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    result: dict[str, Any] = {}

    def error(fn: Any) -> str:
        try:
            fn()
        except ShardingError as e:
            return str(e)
        return ""

    try:
        whole = torch.arange(7 * 3).reshape(7, 3)
        bounds = [0, 9, 21]  # rank 0 holds 9 elements, rank 1 the other 12
        local = whole.reshape(-1)[bounds[rank] : bounds[rank + 1]]
        layout = shard_layout({"w": local, "empty": torch.zeros(0 if rank else 4)}, {"w": (7, 3), "empty": (4,)})
        result["layout"] = {n: (tuple(s.shape), s.start, s.counts) for n, s in layout.items()}
        result["take"] = layout["w"].take(whole * 10, like=local)
        result["packed"] = gather_packed_mask(local % 2 == 0, layout["w"])
        result["replicated"] = error(lambda: shard_layout({"w": whole}, {"w": (7, 3)}))
        mesh = init_device_mesh("cpu", (world_size,))
        by_row = distribute_tensor(whole.float(), mesh, [Shard(0)])
        result["row_layout"] = shard_layout({"w": by_row}, {"w": (7, 3)})["w"].start
        by_column = distribute_tensor(whole.float(), mesh, [Shard(1)])
        result["column"] = error(lambda: shard_layout({"w": by_column}, {"w": (7, 3)}))
        torch.manual_seed(0)
        for use_orig_params in (True, False):
            cpu = {"device_id": torch.device("cpu"), "use_orig_params": use_orig_params}
            model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))
            model[1] = FullyShardedDataParallel(model[1], **cpu)
            wrapped = FullyShardedDataParallel(model, **cpu)
            key = f"use_orig_params={use_orig_params}"
            result[key] = error(lambda w=wrapped, k=key: result.__setitem__(f"{k} shapes", whole_shapes(w)))
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def ddp_channel_rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One DDP rank of `structure='channel'`, each rank seeded differently (the callback shrinks before DDP wraps)."""
    _set_rank_environment(rank, world_size, port)
    torch.manual_seed(rank)
    model = BoringClassifier(dropout=0.0, optimizer="adam", lr=0.05)
    pruning = SNIPPruning(sparsity=0.5, structure="channel", plot=False)
    loader = DataLoader(make_data(32), batch_size=4)  # a DistributedSampler: rank r scores its own first batch
    fit(model, [pruning], loader, strategy="ddp", devices=world_size, precision="64-true", max_epochs=1)
    torch.save(
        {
            "structure": pruning.state_dict()["structure"],
            "weights": {k: v.detach().clone() for k, v in model.named_parameters()},
        },
        f"{out_dir}/rank{rank}.pt",
    )
    leave_together()
