"""Channel pruning at initialization: per-weight scores summed per channel group, and a physically smaller network.

Plain PyTorch, no Lightning. The channel dependencies (which layers must lose the same channel together: a
convolution's output channels, the BatchNorm after it, the next layers' input channels, every branch of a residual
sum, the slices of a concatenation) are traced by Torch-Pruning's ``DependencyGraph``, an optional extra
(``pip install "lightning-snip[structured]"``). The scores are the project's own: any criterion's per-weight scores,
summed over every candidate weight slice that writes to or reads from a channel.

The pipeline: :func:`trace_channel_groups` (refuses what cannot be traced, before any change), :func:`group_scores`,
:func:`select_channels`, :func:`shrink` (slices weights, biases, BatchNorm statistics and affine parameters; returns
a record), and :func:`replay` of a record on a freshly built model (a resumed run, a fresh process).
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_snip.isolation import eval_mode

EXTRA = 'pip install "lightning-snip[structured]"'
_RECURRENT = (nn.RNNBase, nn.RNNCellBase)
_ROOTS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def torch_pruning() -> Any:
    """The ``torch_pruning`` module, or an ``ImportError`` that names the extra to install."""
    try:
        import torch_pruning as tp
    except ImportError as error:  # pragma: no cover - the test environment has it
        raise ImportError(
            f"`structure='channel'` traces channel dependencies with Torch-Pruning, which is not installed. Install the"
            f" extra: {EXTRA}"
        ) from error
    return tp


class UntraceableError(ValueError):
    """The model's channel dependencies cannot be traced reliably; nothing was changed."""


@dataclass
class Member:
    """One candidate weight slice of a channel group.

    ``param``'s slices ``idxs`` along ``dim`` are the group's channels ``root_idxs``.
    """

    param: str
    dim: int
    idxs: Tensor
    root_idxs: Tensor


@dataclass
class ChannelGroup:
    """Channels that are removed together, named after the layer whose output channels they are."""

    name: str
    size: int
    members: list[Member] = field(default_factory=list)


def _custom_function_owner(model: nn.Module, example_input: Tensor) -> tuple[str, str] | None:
    """The innermost module whose forward runs a custom ``autograd.Function``, and that function, if any."""
    found: list[tuple[str, str]] = []
    inputs: dict[str, set[Any]] = {}
    names = {id(m): n for n, m in model.named_modules()}

    def pre(module: nn.Module, args: Any) -> None:
        inputs[names[id(module)]] = {a.grad_fn for a in args if isinstance(a, Tensor) and a.grad_fn is not None}

    def post(module: nn.Module, args: Any, out: Any) -> None:
        if found or not isinstance(out, Tensor) or out.grad_fn is None:
            return
        stop: set[Any] = inputs.get(names[id(module)], set())
        stack: list[Any] = [out.grad_fn]
        seen: set[Any] = set()
        while stack:
            node = stack.pop()
            if node is None or node in stop or node in seen:
                continue
            seen.add(node)
            if isinstance(node, torch.autograd.function.BackwardCFunction):
                found.append((names[id(module)] or "<model>", type(node).__name__.removesuffix("Backward")))
                return
            stack.extend(next_node for next_node, _ in node.next_functions)

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        with torch.enable_grad():
            model(example_input.detach().requires_grad_(example_input.is_floating_point()))
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _output_modules(model: nn.Module, example_input: Tensor) -> set[str]:
    """The layers whose output channels are the network's output (a classifier's last layer)."""
    order: list[tuple[str, Tensor]] = []
    names = {id(m): n for n, m in model.named_modules()}
    handles = [
        m.register_forward_hook(lambda mod, args, out: order.append((names[id(mod)], out)))
        for m in model.modules()
        if isinstance(m, _ROOTS)
    ]
    try:
        with torch.no_grad():
            output = model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    outputs = [output] if isinstance(output, Tensor) else [t for t in _flatten(output) if isinstance(t, Tensor)]
    direct = {name for name, out in order for o in outputs if out.data_ptr() == o.data_ptr()}
    return direct or ({order[-1][0]} if order else set())


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, Mapping):
        for v in value.values():
            yield from _flatten(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    else:
        yield value


def trace_channel_groups(
    model: nn.Module,
    example_input: Tensor,
    candidates: Mapping[str, Tensor],
    exclude: Sequence[str] = (),
) -> tuple[Any, list[ChannelGroup]]:
    """Trace ``model`` on ``example_input`` and return its dependency graph and its prunable channel groups.

    A group is prunable when its root is a convolution or ``nn.Linear`` whose output is not the network's output,
    and none of its layers' parameters matches ``exclude``. Members are the ``candidates`` (by parameter name) whose
    slices write to or read from the group's channels.

    Raises:
        ImportError: If Torch-Pruning is not installed (the message names the extra).
        UntraceableError: For recurrent layers, custom autograd functions and grouped convolutions other than
            depthwise ones, naming the module; the model is not changed.
    """
    tp = torch_pruning()
    params = {id(p): n for n, p in model.named_parameters()}
    module_names = {id(m): n for n, m in model.named_modules()}
    excluded_modules = {
        name
        for name, m in model.named_modules()
        if any(_matches(f"{name}.{p}" if name else p, exclude) for p, _ in m.named_parameters(recurse=False))
    }
    for name, module in model.named_modules():
        if isinstance(module, _RECURRENT) and name not in excluded_modules:
            raise UntraceableError(
                f"`structure='channel'` cannot remove channels of the recurrent layer {name!r}"
                f" ({type(module).__name__}): its gates tie channels across time steps in ways the channel tracing"
                f" does not follow. Exclude its parameters (`exclude=['{name}.*']`) or use `structure='weight'`."
            )
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups not in (1, module.in_channels):
            raise UntraceableError(
                f"`structure='channel'` removes channels of depthwise and ordinary convolutions, but {name!r} has"
                f" groups={module.groups} (neither 1 nor its {module.in_channels} input channels). Exclude it"
                f" (`exclude=['{name}.*']`) or use `structure='weight'`."
            )
    with eval_mode(model):
        custom = _custom_function_owner(model, example_input)
        if custom is not None:
            raise UntraceableError(
                f"`structure='channel'` cannot trace channels through the custom autograd function {custom[1]!r} in"
                f" module {custom[0]!r}: what it does to channels is unknown. Exclude that module's parameters"
                f" (`exclude=['{custom[0]}.*']`) or use `structure='weight'`."
            )
        outputs = _output_modules(model, example_input)
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    ignored = [m for name, m in model.named_modules() if name in outputs | excluded_modules]
    groups: list[ChannelGroup] = []
    for tp_group in graph.get_all_groups(ignored_layers=ignored, root_module_types=list(_ROOTS)):
        root = tp_group[0].dep.target.module
        group = ChannelGroup(name=module_names[id(root)], size=_out_channels(root))
        skip = False
        seen: set[tuple[int, str]] = set()
        for item in tp_group:
            module = item.dep.target.module
            handler = getattr(item.dep.handler, "__name__", str(item.dep.handler))
            name = module_names.get(id(module))
            if name is None:  # an operation (add, concatenation, flatten), not a layer
                continue
            if name in excluded_modules or (name in outputs and handler == "prune_out_channels"):
                skip = True  # an excluded layer, or the network's output channels: never pruned
                break
            key = (id(module), handler)
            if key in seen:
                continue
            seen.add(key)
            member = _member(module, handler, params, item, candidates)
            if member is not None:
                group.members.append(member)
        if not skip and group.size > 1:
            groups.append(group)
    return graph, groups


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return int(getattr(module, "out_channels"))  # noqa: B009  (a convolution's)


def _member(
    module: nn.Module, handler: str, params: Mapping[int, str], item: Any, candidates: Mapping[str, Tensor]
) -> Member | None:
    """The candidate weight slice a group item stands for, if it has one."""
    if not isinstance(module, _ROOTS):
        return None  # BatchNorm and other per-channel layers: sliced, not scored
    weight = getattr(module, "weight", None)
    name = params.get(id(weight)) if weight is not None else None
    if name is None or name not in candidates:
        return None
    depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
    if handler == "prune_out_channels":
        dim = 0
    elif handler == "prune_in_channels" and not depthwise:  # a depthwise weight's input is its output channel
        dim = 1
    else:
        return None
    return Member(
        param=name,
        dim=dim,
        idxs=torch.as_tensor(list(item.idxs), dtype=torch.long),
        root_idxs=torch.as_tensor(list(item.root_idxs), dtype=torch.long),
    )


def group_scores(groups: Sequence[ChannelGroup], scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each group's channel scores (float64): the sum of the per-weight scores of every member slice.

    Example::

        >>> g = ChannelGroup("fc1", 2, [Member("fc1.weight", 0, torch.tensor([0, 1]), torch.tensor([0, 1])),
        ...                             Member("fc2.weight", 1, torch.tensor([0, 1]), torch.tensor([0, 1]))])
        >>> group_scores([g], {"fc1.weight": torch.ones(2, 3), "fc2.weight": torch.ones(4, 2)})["fc1"]
        tensor([7., 7.], dtype=torch.float64)
    """
    out = {}
    for group in groups:
        total = torch.zeros(group.size, dtype=torch.float64)
        for member in group.members:
            score = scores[member.param].detach().to(torch.float64).cpu()
            per_channel = score.movedim(member.dim, 0).reshape(score.shape[member.dim], -1).sum(1)
            total.index_add_(0, member.root_idxs, per_channel[member.idxs])
        out[group.name] = total
    return out


def kept_widths(
    sizes: Mapping[str, int], sparsity: float, scope: str, min_density: float = 0.0, multiple: int = 1
) -> dict[str, int] | None:
    """Per-group kept counts for ``scope="layerwise"`` (``None`` for global, which depends on the scores).

    Each group keeps ``kept_count(size, sparsity)`` channels, at least one and ``ceil(min_density * size)``, rounded
    up to ``multiple`` (at most its size).
    """
    if scope != "layerwise":
        return None
    return {
        name: _round_up(max(size - round(sparsity * size), _floor(size, min_density)), multiple, size)
        for name, size in sizes.items()
    }


def _floor(size: int, min_density: float) -> int:
    return max(1, min(size, math.ceil(min_density * size - 1e-9)))


def _round_up(count: int, multiple: int, size: int) -> int:
    return min(size, -(-count // multiple) * multiple)


def select_channels(
    scores: Mapping[str, Tensor], sparsity: float, scope: str, min_density: float = 0.0, multiple: int = 1
) -> dict[str, Tensor]:
    """Which channels each group keeps (``True`` = kept).

    ``"global"`` removes ``round(sparsity * N)`` of all ``N`` prunable channels, the lowest-scored across the
    network, after every group keeps its best ``max(1, ceil(min_density * size))``; ``"layerwise"`` removes the same
    fraction of every group. Ties go to the earlier group, then the earlier channel. With ``multiple > 1`` each
    group's kept count is then rounded up to a multiple of it (at most the group's size), keeping its next best
    channels, so the total kept may exceed the exact count.

    Example::

        >>> kept = select_channels({"a": torch.tensor([3.0, 1.0, 2.0, 0.5]), "b": torch.tensor([0.1, 0.2])}, 0.5,
        ...                        "global")
        >>> kept["a"].tolist(), kept["b"].tolist()
        ([True, False, True, False], [False, True])
    """
    order = {name: torch.sort(s.to(torch.float64), descending=True, stable=True).indices for name, s in scores.items()}
    sizes = {name: s.numel() for name, s in scores.items()}
    counts = kept_widths(sizes, sparsity, scope, min_density, multiple)
    if counts is None:  # global
        floors = {name: _floor(size, min_density) for name, size in sizes.items()}
        total = sum(sizes.values())
        budget = total - round(sparsity * total)
        if sum(floors.values()) > budget:
            raise ValueError(
                f"`sparsity={sparsity}` keeps {budget} of {total} channels, fewer than the {sum(floors.values())} that"
                " keeping every layer alive (and `min_density`) needs. Lower `sparsity` or `min_density`."
            )
        rest: list[
            tuple[float, int, int]
        ] = []  # (score, group index, rank within group) of the channels beyond each floor
        for g, (name, s) in enumerate(scores.items()):
            ranked = order[name][floors[name] :]
            rest.extend((-float(s[i]), g, r) for r, i in enumerate(ranked.tolist()))
        extra = sorted(rest)[: budget - sum(floors.values())]
        counts = dict(floors)
        names = list(scores)
        for _, g, _ in extra:
            counts[names[g]] += 1
        counts = {name: _round_up(c, multiple, sizes[name]) for name, c in counts.items()}
    kept = {}
    for name, count in counts.items():
        mask = torch.zeros(sizes[name], dtype=torch.bool)
        mask[order[name][:count]] = True
        kept[name] = mask
    return kept


class SizeCounter:
    """How large ``model`` would be after :func:`shrink` with given kept channels, without changing it.

    Two sizes: its parameters (:meth:`parameters`, as :func:`count_parameters` counts them) and its weight MACs
    (:meth:`macs`, as :func:`count_weight_macs` counts them on ``example_input``). Each group's layers (and how many
    of their slices one channel stands for: a convolution's channel is ``H * W`` inputs of a linear layer after
    ``flatten``) are read from the dependency graph once; each touched layer is shrunk as a copy on the ``meta``
    device (shapes only, no memory), cached by how many slices it loses.
    """

    def __init__(
        self, model: nn.Module, graph: Any, groups: Sequence[ChannelGroup], example_input: Tensor | None = None
    ) -> None:
        modules = dict(model.named_modules())
        names = {id(m): n for n, m in modules.items()}
        self._modules = modules
        self._positions = _weight_positions(model, example_input) if example_input is not None else None
        self._touches: dict[str, list[tuple[str, str, int]]] = {}  # group -> (module, handler, slices per channel)
        for group in groups:
            root = modules[group.name]
            tp_group = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, idxs=[0])
            touches: dict[tuple[str, str], int] = {}
            for item in tp_group:
                name = names.get(id(item.dep.target.module))
                if name is not None:
                    handler = getattr(item.dep.handler, "__name__", str(item.dep.handler))
                    touches.setdefault((name, handler), len(item.idxs))
            self._touches[group.name] = [(m, h, n) for (m, h), n in touches.items()]
        self._cache: dict[tuple[str, tuple[tuple[str, int], ...]], tuple[int, int]] = {}
        self.dense_parameters = count_parameters(model)
        self.dense_macs = sum(self._weight(m) * n for m, n in (self._positions or {}).items())

    def parameters(self, kept: Mapping[str, Tensor]) -> int:
        """The parameters left after removing every group's unkept channels.

        A weight tied between two shrunk layers would be counted twice.
        """
        return self.dense_parameters - sum(saved for saved, _ in self._savings(kept))

    def macs(self, kept: Mapping[str, Tensor]) -> int:
        """The weight MACs left after removing every group's unkept channels.

        Raises:
            ValueError: If the counter was built without an example input.
        """
        if self._positions is None:
            raise ValueError("Counting MACs needs the example input: build the counter with `example_input`.")
        return self.dense_macs - sum(saved for _, saved in self._savings(kept))

    def _weight(self, module: str) -> int:
        return int(self._modules[module].weight.numel())

    def _savings(self, kept: Mapping[str, Tensor]) -> list[tuple[int, int]]:
        """``(parameters, weight MACs)`` each layer the removal touches no longer holds."""
        lost: dict[str, dict[str, int]] = {}
        for group_name, mask in kept.items():
            removed = int((~mask).sum())
            if removed:
                for module, handler, slices in self._touches[group_name]:
                    per_module = lost.setdefault(module, {})
                    per_module[handler] = per_module.get(handler, 0) + removed * slices
        savings = []
        for module, handlers in lost.items():
            key = (module, tuple(sorted(handlers.items())))
            if key not in self._cache:
                layer = self._modules[module]
                parameters, weight = _shrunk_size(layer, handlers)
                positions = (self._positions or {}).get(module, 0)
                self._cache[key] = (
                    sum(p.numel() for p in layer.parameters(recurse=False)) - parameters,
                    (self._weight(module) - weight) * positions,
                )
            savings.append(self._cache[key])
        return savings


def _shrunk_size(module: nn.Module, handlers: Mapping[str, int]) -> tuple[int, int]:
    """``(parameters, weight entries)`` of ``module`` once each handler has removed that many slices."""
    replica = copy.copy(module)  # a new object with its own attribute dict; shapes on `meta`, no data
    replica._parameters = {
        name: None if p is None else nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for name, p in module._parameters.items()
    }
    replica._buffers = {
        name: None if b is None else torch.empty_like(b, device="meta") for name, b in module._buffers.items()
    }
    replica._modules = {}  # only this layer's own tensors are sliced and counted
    pruner = torch_pruning().DependencyGraph().get_pruner_of_module(replica)
    for handler, count in handlers.items():
        getattr(pruner, handler)(replica, list(range(count)))
    weight = getattr(replica, "weight", None)
    return sum(p.numel() for p in replica.parameters(recurse=False)), int(weight.numel()) if weight is not None else 0


def _weight_positions(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """For every convolution and linear layer, at how many output positions its weight is applied on an input.

    A convolution: ``H * W`` per example; a linear layer: its leading dimensions; summed over calls.
    """
    positions: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _ROOTS):

            def hook(module: nn.Module, args: Any, out: Tensor, name: str = name) -> None:
                channels = out.shape[1] if isinstance(module, nn.modules.conv._ConvNd) else out.shape[-1]
                positions[name] = positions.get(name, 0) + out.numel() // channels

            handles.append(module.register_forward_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return positions


def count_weight_macs(model: nn.Module, example_input: Tensor) -> int:
    """Weight MACs of one forward on ``example_input``: each convolution's and linear layer's weights times positions.

    Every weight entry is multiplied once per output position its layer is applied at (the multiply-accumulates of
    ``x @ W``); bias adds, normalization and activations are not counted, unlike :func:`count_macs`.

    Example::

        >>> count_weight_macs(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(512, 10)),
        ...                   torch.zeros(1, 3, 8, 8))
        18944
    """
    modules = dict(model.named_modules())
    return sum(int(modules[name].weight.numel()) * n for name, n in _weight_positions(model, example_input).items())


def channel_costs(sizes: Mapping[str, int], size: Callable[[Mapping[str, Tensor]], int]) -> list[int]:
    """What removing one channel of each group (and nothing else) saves from the dense network's ``size``, at least 1.

    Example::

        >>> channel_costs({"a": 3, "b": 2}, lambda kept: int(sum(5 * m.sum() for m in kept.values())))
        [5, 5]
    """
    dense = {name: torch.ones(n, dtype=torch.bool) for name, n in sizes.items()}
    full = size(dense)
    costs = []
    for name, n in sizes.items():
        one_less = dict(dense)
        one_less[name] = torch.arange(n) > 0
        costs.append(max(1, full - size(one_less)))
    return costs


def select_channels_within(
    scores: Mapping[str, Tensor],
    budget: int,
    size: Callable[[Mapping[str, Tensor]], int],
    scope: str,
    min_density: float = 0.0,
    multiple: int = 1,
    unit: str = "parameters",
) -> dict[str, Tensor]:
    """The fewest channels removed, lowest-ranked first, that leave a network of at most ``budget``.

    ``size`` maps kept channels to the size left (:meth:`SizeCounter.parameters` or :meth:`SizeCounter.macs`; ``unit``
    names it in the error). ``"global"`` ranks every channel by its score per unit of the size it frees (what removing
    one channel of its group saves from the dense network): a knapsack's greedy order, so that a cheap channel is not
    removed before a costly one of the same value, which ranking by score alone does (the channels of a wide linear
    layer score low and free few MACs, those of an early convolution score high and free many), and then removes
    channels one by one in that order; ``"layerwise"`` raises the fraction every group loses. Both are searched by
    bisection: the size left never grows as more channels go.

    Raises:
        ValueError: If even removing every channel the floors allow (one per layer, ``min_density``) leaves more.
    """
    sizes = {name: s.numel() for name, s in scores.items()}
    total = sum(sizes.values())
    if scope == "global":  # score per unit of size freed; then remove 0, 1, ... channels, down to the floors
        costs = channel_costs(sizes, size)
        scores = {name: s.to(torch.float64) / cost for (name, s), cost in zip(scores.items(), costs, strict=True)}
        floors = sum(_floor(n, min_density) for n in sizes.values())
        fractions = [removed / total for removed in range(total - floors + 1)]
    else:  # one fraction between each two consecutive points where a group's rounded count changes
        steps = sorted({(i + 0.5) / n for n in set(sizes.values()) for i in range(n)})
        fractions = [0.0, *((a + b) / 2 for a, b in itertools.pairwise(steps)), (steps[-1] + 1.0) / 2]

    def left(index: int) -> tuple[dict[str, Tensor], int]:
        kept = select_channels(scores, fractions[index], scope, min_density, multiple)
        return kept, size(kept)

    low, high = 0, len(fractions) - 1
    kept, smallest = left(high)
    if smallest > budget:
        raise ValueError(
            f"Removing every channel that `min_density` and the one-channel-per-layer floor allow still leaves"
            f" {smallest:,} {unit}, more than the {budget:,} that `sparsity` allows with `sparsity_of='{unit.lower()}'`"
            " (the output layer, `exclude`d layers and what lies outside channel groups stay). Lower `sparsity` or"
            " `min_density`."
        )
    first, largest = left(low)
    if largest <= budget:
        return first
    while high - low > 1:  # removing fractions[low] leaves too much, fractions[high] is enough
        middle = (low + high) // 2
        candidate, left_size = left(middle)
        if left_size <= budget:
            high, kept = middle, candidate
        else:
            low = middle
    return kept


def shrink(model: nn.Module, graph: Any, kept: Mapping[str, Tensor]) -> list[dict[str, Any]]:
    """Remove every group's unkept channels from ``model``, in place; return the record :func:`replay` repeats.

    Weights, biases, BatchNorm running statistics and affine parameters are sliced by Torch-Pruning, so the model
    keeps its own classes (``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm2d``) with smaller shapes.
    """
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    record: list[dict[str, Any]] = []
    for group_name, mask in kept.items():
        removed = (~mask).nonzero().squeeze(1).tolist()
        if not removed:
            continue
        root = modules[group_name]
        pruner = graph.get_pruner_of_module(root)
        group = graph.get_pruning_group(root, pruner.prune_out_channels, idxs=removed)
        for item in group:
            name = names.get(id(item.dep.target.module))
            if name is not None:
                handler = getattr(item.dep.handler, "__name__", str(item.dep.handler))
                record.append({"module": name, "fn": handler, "idxs": [int(i) for i in item.idxs]})
        group.prune()
    return record


def replay(model: nn.Module, record: Sequence[Mapping[str, Any]]) -> None:
    """Remove the channels a :func:`shrink` record names from a freshly built ``model``, in place, in its order.

    Raises:
        ValueError: If a module of the record is missing, or its shape no longer fits (not the model it was made
            for); checked for every entry before any change.
    """
    tp = torch_pruning()
    modules = dict(model.named_modules())
    missing = sorted({entry["module"] for entry in record if entry["module"] not in modules})
    if missing:
        raise ValueError(
            f"The structure record names modules this model does not have: {missing}. Restore it into the model"
            " class it was made for (the same LightningModule)."
        )
    lookup = tp.DependencyGraph()
    for entry in record:
        module = modules[entry["module"]]
        pruner = lookup.get_pruner_of_module(module)
        if pruner is None:
            raise ValueError(f"No channel pruner for {entry['module']!r} ({type(module).__name__}).")
        getattr(pruner, entry["fn"])(module, list(entry["idxs"]))


def count_parameters(model: nn.Module) -> int:
    """Number of parameter entries (tied parameters once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_input: Tensor) -> int:
    """Multiply-accumulates of one forward on ``example_input`` (convolutions and linear layers), by Torch-Pruning."""
    tp = torch_pruning()
    with eval_mode(model), torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(model, example_inputs=example_input)
    return int(macs)


def structure_record(checkpoint: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The channel structure record a ``SNIPPruning(structure='channel')`` stored in a Lightning checkpoint, if any.

    Raises:
        ValueError: If several ``SNIPPruning`` states in it hold one (which to restore is ambiguous).
    """
    states = checkpoint.get("callbacks") or {}
    found = [
        (key, state["structure"])
        for key, state in states.items()
        if isinstance(key, str)
        and key.startswith("SNIPPruning")
        and isinstance(state, Mapping)
        and state.get("structure") is not None
    ]
    if len(found) > 1:
        raise ValueError(f"The checkpoint holds {len(found)} channel structures ({[k for k, _ in found]}); ambiguous.")
    return [dict(entry) for entry in found[0][1]] if found else None


def restore_structure(model: nn.Module, checkpoint: str | Path | Mapping[str, Any]) -> nn.Module:
    """Shrink a freshly built ``model`` to the channel structure of a checkpoint, so its weights load.

    For a model trained with ``SNIPPruning(structure='channel')``: the callback stored which channels it removed, and
    this removes the same ones (no scoring), so ``model.load_state_dict(checkpoint["state_dict"])`` works in a fresh
    process, also after global pruning, where the widths differ layer by layer. To make
    ``LightningModule.load_from_checkpoint`` work, call it from the module's ``on_load_checkpoint`` (Lightning calls
    that hook before it loads the weights)::

        def on_load_checkpoint(self, checkpoint):
            lightning_snip.restore_structure(self, checkpoint)

    Args:
        model: The model as its class builds it (the ``LightningModule`` the checkpoint was written from).
        checkpoint: A Lightning checkpoint's path or its loaded dict.

    Returns:
        ``model``, shrunk in place; unchanged if the checkpoint holds no channel structure or the model already has
        its shapes.

    Raises:
        ValueError: If the record does not fit the model (another model class), or is ambiguous.
    """
    loaded: Mapping[str, Any] = (
        checkpoint
        if isinstance(checkpoint, Mapping)
        else torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
    )
    record = structure_record(loaded)
    if record is None:
        return model
    state = loaded.get("state_dict")
    if isinstance(state, Mapping) and _fits(model, state):
        return model  # already shrunk (say, restored once already)
    replay(model, record)
    return model


def _fits(model: nn.Module, state: Mapping[str, Any]) -> bool:
    own = model.state_dict()
    return all(k in own and tuple(own[k].shape) == tuple(v.shape) for k, v in state.items() if isinstance(v, Tensor))
