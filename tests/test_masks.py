import math

import pytest
import torch

from lightning_snip.enforcement import (
    ZERO_PRESERVING_OPTIMIZERS,
    MaskSet,
    apply_masks_,
    count_zeros,
    holds_nonzero,
    keeps_zeros,
)
from lightning_snip.packing import pack_mask, unpack_mask
from lightning_snip.report import format_report, sparsity_report
from lightning_snip.selection import all_finite, kept_count, select_masks


@pytest.mark.parametrize(
    ("total", "sparsity", "expected"),
    [(100, 0.95, 5), (10, 0.0, 10), (7, 0.5, 3), (3, 0.5, 1), (1000, 0.999, 1), (10, 0.99, 0)],
    ids=["95pct", "zero", "half-rounds-even-up", "half-rounds-even-down", "tiny-keep", "all-pruned"],
)
def test_kept_count(total, sparsity, expected):
    assert kept_count(total, sparsity) == expected


def test_global_golden():
    # Scores worked out by hand: 6 weights, sparsity 0.5 -> keep 3: the values 9, 8, 7.
    scores = {"a": torch.tensor([[9.0, 1.0], [2.0, 7.0]]), "b": torch.tensor([8.0, 3.0])}
    masks = select_masks(scores, 0.5, "global")
    assert masks["a"].tolist() == [[True, False], [False, True]]
    assert masks["b"].tolist() == [True, False]


def test_layerwise_golden():
    scores = {"a": torch.tensor([[9.0, 1.0], [2.0, 7.0]]), "b": torch.tensor([8.0, 3.0])}
    masks = select_masks(scores, 0.5, "layerwise")
    assert masks["a"].tolist() == [[True, False], [False, True]]  # keep 2 of 4
    assert masks["b"].tolist() == [True, False]  # keep 1 of 2


def test_ties_go_to_the_earlier_position_across_tensors():
    # All equal: keep 3 of 6 -> the first three in (tensor order, row-major) order.
    scores = {"a": torch.ones(2, 2), "b": torch.ones(2)}
    masks = select_masks(scores, 0.5, "global")
    assert masks["a"].tolist() == [[True, True], [True, False]]
    assert masks["b"].tolist() == [False, False]
    # Ties only at the threshold: 5 > everything, then four 2s compete for two places.
    scores = {"a": torch.tensor([2.0, 5.0, 2.0]), "b": torch.tensor([2.0, 2.0, 0.0])}
    masks = select_masks(scores, 0.5, "global")
    assert masks["a"].tolist() == [True, True, True]
    assert masks["b"].tolist() == [False, False, False]


@pytest.mark.parametrize("scope", ["global", "layerwise"], ids=["global", "layerwise"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.98, 0.999], ids=lambda s: f"s{s}")
def test_exact_count_with_many_ties(scope, sparsity):
    g = torch.Generator().manual_seed(0)
    scores = {f"t{i}": torch.randint(0, 4, (17 + i, 5), generator=g).float() for i in range(4)}
    masks = select_masks(scores, sparsity, scope)
    if scope == "global":
        total = sum(s.numel() for s in scores.values())
        assert sum(int(m.sum()) for m in masks.values()) == kept_count(total, sparsity)
    else:
        for name, m in masks.items():
            assert int(m.sum()) == kept_count(scores[name].numel(), sparsity)
    # every kept score is >= every pruned score (within a tensor for layerwise, globally for global)
    groups = [list(scores)] if scope == "global" else [[n] for n in scores]
    for group in groups:
        kept = torch.cat([scores[n][masks[n]] for n in group])
        pruned = torch.cat([scores[n][~masks[n]] for n in group])
        if kept.numel() and pruned.numel():
            assert kept.min() >= pruned.max()


def test_deterministic_and_matches_stable_sort():
    g = torch.Generator().manual_seed(1)
    scores = {
        "a": torch.randint(0, 3, (50,), generator=g).float(),
        "b": torch.randint(0, 3, (30,), generator=g).float(),
    }
    masks = select_masks(scores, 0.7, "global")
    flat = torch.cat([scores["a"], scores["b"]])
    order = torch.sort(flat, descending=True, stable=True).indices[: kept_count(80, 0.7)]
    expected = torch.zeros(80, dtype=torch.bool)
    expected[order] = True
    assert torch.equal(torch.cat([masks["a"], masks["b"]]), expected)
    assert all(torch.equal(masks[k], v) for k, v in select_masks(scores, 0.7, "global").items())


def test_non_finite_scores_are_rejected():
    with pytest.raises(ValueError, match="`bad` are not all finite"):
        select_masks({"bad": torch.tensor([1.0, float("nan")])}, 0.5)


def test_apply_masks_is_exact_even_for_nan_and_inf():
    w = torch.tensor([1.0, float("nan"), float("-inf"), -2.0])
    other = torch.tensor([[3.0, -4.0]])
    keep_w, keep_other = torch.tensor([True, False, False, False]), torch.tensor([[False, True]])
    apply_masks_([w, None, other], [keep_w, torch.tensor([True]), keep_other])
    assert w.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert other.tolist() == [[0.0, -4.0]]
    assert count_zeros([w]) == 3


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128]
)
def test_apply_masks_is_bit_exact_in_every_dtype(dtype):
    values = [1.5, -7.0, float("inf"), float("nan"), -0.25, 3.0]
    w = torch.tensor(values, dtype=dtype)
    kept = torch.tensor([True, False, False, False, True, False])
    before = w.clone()
    apply_masks_([w], [kept])
    assert torch.equal(w[~kept], torch.zeros(4, dtype=dtype))
    assert not torch.signbit(w[~kept].real).any()  # +0.0, not the -0.0 a float multiply by zero leaves
    assert torch.equal(w[kept], before[kept])  # kept entries untouched bit for bit


def test_apply_masks_keeps_nan_where_kept():
    w = torch.tensor([float("nan"), float("inf"), 2.0])
    apply_masks_([w], [torch.tensor([True, False, False])])
    assert torch.isnan(w[0])
    assert w[1:].tolist() == [0.0, 0.0]


def test_mask_set_is_prepared_once_and_reused():
    kept = [torch.tensor([True, False, True]), torch.tensor([[False, True]])]
    masks = MaskSet(kept)
    assert len(masks) == 2
    for step in range(3):  # the same masks zero fresh tensors on every call, nan and inf included
        a, b = torch.tensor([1.0, float("nan"), 3.0]) * (step + 1), torch.tensor([[float("inf"), 2.0]])
        masks.zero_([a, b])
        assert a.tolist() == [step + 1.0, 0.0, 3.0 * (step + 1)]
        assert b.tolist() == [[0.0, 2.0]]
    w = torch.tensor([4.0, 5.0, 6.0])
    masks.zero_([w, None])  # a parameter without a gradient is skipped
    assert w.tolist() == [4.0, 0.0, 6.0]
    weight = torch.nn.Parameter(torch.ones(3))  # a leaf that requires grad: zeroed in place all the same
    masks.zero_([weight, torch.zeros(1, 2)])
    assert weight.tolist() == [1.0, 0.0, 1.0]
    assert weight.requires_grad
    MaskSet([]).zero_([])


def test_mask_set_rejects_bad_input():
    with pytest.raises(TypeError, match=r"bool masks .* shapes \[\(2,\)\]"):
        MaskSet([torch.ones(2)])
    with pytest.raises(ValueError, match="Got 1 tensors for 2 masks"):
        MaskSet([torch.ones(2, dtype=torch.bool)] * 2).zero_([torch.ones(2)])
    with pytest.raises(ValueError, match=r"Tensor 1 has shape \(2, 3\) but its mask \(3,\)"):
        MaskSet([torch.ones(3, dtype=torch.bool)] * 2).zero_([torch.ones(3), torch.ones(2, 3)])  # would broadcast


def test_threshold_counts_the_ties_at_the_kth_score():
    import lightning_snip.selection as masks_module

    key_of_two = int(torch.tensor([2.0]).view(torch.int32))
    scores = [torch.tensor([2.0, 5.0, 2.0]), torch.tensor([2.0, 2.0, 0.0])]
    assert masks_module._threshold(scores, 3, None) == (key_of_two, 1, 4)  # keep 2 of the 4 tied 2s
    assert masks_module._threshold(scores, 5, None) == (key_of_two, 1, 4)  # keep them all: a single compare


def test_all_finite_survives_a_sum_that_overflows():
    big = torch.full((4,), 3e38)
    assert math.isinf(float(big.sum()))
    assert all_finite(big)
    assert all_finite(torch.full((8,), 60000.0, dtype=torch.float16))
    assert not all_finite(torch.tensor([1.0, float("inf")]))
    assert not all_finite(torch.tensor([float("nan")]))


def test_sparsity_report_and_table():
    rows = sparsity_report({"layer.weight": torch.tensor([[0.0, 1.0], [0.0, 0.0]]), "b": torch.ones(3)})
    assert [(r.name, r.shape, r.kept, r.total) for r in rows] == [("layer.weight", (2, 2), 1, 4), ("b", (3,), 3, 3)]
    assert rows[0].sparsity == pytest.approx(0.75)
    table = format_report(rows)
    assert "layer.weight" in table
    assert "75.00%" in table
    assert "4/7" in table  # total line


def _reference(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Independent: a stable descending sort of all scores (as float32), keep the first k."""
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[: kept_count(flat.numel(), sparsity)]] = True
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start : start + s.numel()].reshape(s.shape)
        start += s.numel()
    return out


@pytest.mark.parametrize("chunk", [7, 64, 1 << 22], ids=["chunk-7", "chunk-64", "chunk-default"])
@pytest.mark.parametrize("kind", ["continuous", "few-values", "with-negatives", "float64"], ids=lambda k: k)
def test_radix_select_matches_a_stable_sort(monkeypatch, chunk, kind):
    import lightning_snip.selection as masks_module

    monkeypatch.setattr(masks_module, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    shapes = [(13, 11), (40,), (3, 5, 7), (1,)]
    if kind == "continuous":
        scores = {f"t{i}": torch.rand(s, generator=g) for i, s in enumerate(shapes)}
    elif kind == "few-values":
        scores = {f"t{i}": torch.randint(0, 3, s, generator=g).float() for i, s in enumerate(shapes)}
    elif kind == "with-negatives":
        scores = {f"t{i}": torch.randn(s, generator=g) * 1e-3 for i, s in enumerate(shapes)}
    else:
        scores = {f"t{i}": torch.rand(s, generator=g, dtype=torch.float64) for i, s in enumerate(shapes)}
    for sparsity in (0.1, 0.5, 0.9, 0.99):
        got = select_masks(scores, sparsity)
        expected = _reference(scores, sparsity)
        assert all(torch.equal(got[n], expected[n]) for n in scores), sparsity


@pytest.mark.slow
def test_selection_past_two_to_the_31_elements(monkeypatch):
    import lightning_snip.selection as masks_module

    monkeypatch.setattr(masks_module, "_CHUNK", 1 << 27)  # fewer, larger steps: this test is about counting
    huge = torch.tensor([0.5]).expand(2**31 + 10)  # 2**31 + 10 scores in 4 bytes of memory
    small = torch.tensor([1.0, 0.25, 2.0])
    key_of = {v: int(torch.tensor([v]).view(torch.int32)) for v in (2.0, 1.0, 0.5, 0.25)}
    assert masks_module.kth_largest_key([huge, small], 2) == (key_of[1.0], 1)
    assert masks_module.kth_largest_key([small, huge], 2**31 + 13) == (key_of[0.25], 2**31 + 12)


@pytest.mark.parametrize("chunk", [8, 1 << 22], ids=["chunk-8", "chunk-default"])
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 7), (64, 9)], ids=lambda s: "x".join(map(str, s)))
def test_pack_unpack_round_trip(monkeypatch, chunk, shape):
    import lightning_snip.selection as masks_module

    monkeypatch.setattr(masks_module, "_CHUNK", chunk)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.3
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, shape), mask)
    # independent of the implementation: bit i of the stream is entry i, most significant bit first
    bits = [(int(packed[i // 8]) >> (7 - i % 8)) & 1 for i in range(mask.numel())]
    assert bits == mask.reshape(-1).int().tolist()


ZERO_PRESERVING_CASES = {
    "sgd-momentum-nesterov-wd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    "sgd-dampening-maximize": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "maximize": True}),
    "adam-amsgrad-wd": (torch.optim.Adam, {"lr": 0.1, "amsgrad": True, "weight_decay": 0.1}),
    "adam-single-tensor": (torch.optim.Adam, {"lr": 0.1, "foreach": False}),
    "adamw": (torch.optim.AdamW, {"lr": 0.1, "weight_decay": 0.5}),
    "adamax": (torch.optim.Adamax, {"lr": 0.1, "weight_decay": 0.1}),
    "nadam-decoupled": (torch.optim.NAdam, {"lr": 0.1, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    "radam": (torch.optim.RAdam, {"lr": 0.1, "weight_decay": 0.1}),
    "adagrad-initial-accumulator": (torch.optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.5}),
    "adadelta": (torch.optim.Adadelta, {"lr": 1.0, "weight_decay": 0.1}),
    "rmsprop-centered-momentum": (torch.optim.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.9}),
    "rprop": (torch.optim.Rprop, {"lr": 0.1}),
    "asgd": (torch.optim.ASGD, {"lr": 0.1, "weight_decay": 0.1, "t0": 0}),
}


def test_every_zero_preserving_optimizer_is_exercised():
    assert {cls for cls, _ in ZERO_PRESERVING_CASES.values()} == set(ZERO_PRESERVING_OPTIMIZERS)


@pytest.mark.parametrize(("cls", "kwargs"), ZERO_PRESERVING_CASES.values(), ids=ZERO_PRESERVING_CASES.keys())
def test_zero_preserving_optimizers_leave_pruned_weights_at_zero(cls, kwargs):
    g = torch.Generator().manual_seed(0)
    kept = [torch.rand(6, 5, generator=g) < 0.4, torch.rand(7, generator=g) < 0.4]
    weights = [torch.randn(m.shape, generator=g, dtype=torch.float64).requires_grad_() for m in kept]
    masks = MaskSet(kept)
    masks.zero_(weights)
    start = [w.detach().clone() for w in weights]
    optimizer = cls(weights, **kwargs)
    assert keeps_zeros(optimizer)
    for _ in range(25):
        loss = sum(((w - 3.0) ** 2 * torch.randn(w.shape, generator=g, dtype=w.dtype)).sum() for w in weights)
        optimizer.zero_grad()
        loss.backward()
        masks.zero_([w.grad for w in weights])  # what the callback does after every backward
        optimizer.step()  # and no re-zeroing of the weights after it
    assert masks.count_pruned_nonzero(weights) == [0, 0]
    assert all(bool((w.detach()[m] != s[m]).all()) for w, m, s in zip(weights, kept, start, strict=True))


def test_zero_preservation_needs_the_masked_gradients():
    # the same run without masking the gradients moves the pruned weights: the test above can fail
    kept = [torch.tensor([True, False, False])]
    weights = [torch.tensor([1.0, 0.0, 0.0], requires_grad=True)]
    optimizer = torch.optim.SGD(weights, lr=0.1)
    (weights[0] * torch.tensor([1.0, 2.0, -3.0])).sum().backward()
    optimizer.step()
    assert MaskSet(kept).count_pruned_nonzero(weights) == [2]


def test_other_optimizers_do_not_count_as_zero_preserving():
    class MySGD(torch.optim.SGD):
        pass

    w = [torch.zeros(3, requires_grad=True)]
    assert not keeps_zeros(MySGD(w, lr=0.1))  # a subclass may change `step`
    assert not keeps_zeros(torch.optim.LBFGS(w))  # mixes entries through its curvature history


def test_count_pruned_nonzero():
    masks = MaskSet([torch.tensor([True, False, False, False]), torch.tensor([[False, True]])])
    w = [torch.tensor([5.0, float("nan"), -0.0, 2.0]), torch.tensor([[0.0, 7.0]])]
    assert masks.count_pruned_nonzero(w) == [2, 0]  # nan counts, -0.0 is zero, kept entries do not count
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.complex64, torch.int32):
        values = [torch.tensor([5, 3, 0, 2]).to(dtype), torch.tensor([[1, 0]]).to(dtype)]
        assert masks.count_pruned_nonzero(values) == [2, 1], dtype
    assert masks.count_pruned_nonzero([torch.zeros(4), torch.zeros(1, 2)]) == [0, 0]
    with pytest.raises(ValueError, match="Got 1 tensors for 2 masks"):
        masks.count_pruned_nonzero(w[:1])
    with pytest.raises(ValueError, match=r"Tensor 1 has shape \(2,\) but its mask \(1, 2\)"):
        masks.count_pruned_nonzero([w[0], torch.zeros(2)])


def test_holds_nonzero():
    t = [torch.zeros(2, 3), torch.tensor([0.0, -1e-30]), torch.tensor([float("nan")]), torch.zeros(0, 4)]
    assert holds_nonzero(t) == [False, True, True, False]
    assert holds_nonzero([]) == []


def _forms(masks: MaskSet) -> list[str]:
    return ["bits" if f is None else "index" if f.index is not None else "factor" for f in masks._forms]


def _specials(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random values with nan, inf, -inf and -0.0 sprinkled in."""
    t = torch.randn(shape).to(dtype)
    flat = t.view(-1)
    flat[::7], flat[1::11], flat[2::13], flat[3::17] = float("nan"), float("inf"), float("-inf"), -0.0
    return t


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (10**9, ["factor", "factor", "factor"]),  # all fit: the integer form everywhere
        (8 * 60 + 8 * 3, ["index", "bits", "index"]),  # the kept positions of the sparse tensors only
        (8 * 60 + 8 * 3 + 4 * 40, ["index", "factor", "index"]),  # then the integer form where it still fits
        (0, ["bits", "bits", "bits"]),  # nothing fits: the bit multiply
    ],
)
def test_fast_forms_are_chosen_within_the_budget_and_zero_exactly(budget, expected):
    g = torch.Generator().manual_seed(0)
    kept = [torch.zeros(1000, dtype=torch.bool), torch.ones(40, dtype=torch.bool), torch.zeros(5, 6, dtype=torch.bool)]
    kept[0][torch.randperm(1000, generator=g)[:60]] = True  # 6% kept
    kept[1][::2] = False  # 50% kept: too dense for the kept positions
    kept[2][0, :3] = True  # 10% kept
    like = [torch.zeros(m.shape) for m in kept]
    masks = MaskSet(kept, like=like, budget=budget)
    assert _forms(masks) == expected
    assert masks.fast_form_bytes <= budget
    reference = MaskSet(kept)  # the plain bit multiply
    for step in range(2):
        values = [_specials(m.shape) * (step + 1) for m in kept]
        expected_values = [v.clone() for v in values]
        reference.zero_(expected_values)
        masks.zero_(values)
        for got, want, mask in zip(values, expected_values, kept, strict=True):
            assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bit for bit, nan and -0.0 included
            assert torch.equal(got.view(torch.int32)[~mask], torch.zeros_like(got.view(torch.int32)[~mask]))


def test_fast_forms_fall_back_for_other_widths_devices_and_layouts():
    kept = [torch.tensor([[True, False, False, False]] * 4)]
    masks = MaskSet(kept, like=[torch.zeros(4, 4)], budget=10**6)
    assert _forms(masks) == ["factor"]
    for value in (_specials((4, 4), torch.float64), _specials((4, 4), torch.bfloat16), _specials((4, 4)).t()):
        want = value.clone()
        MaskSet(kept).zero_([want])
        masks.zero_([value])  # float64, bfloat16 and a transposed view take the bit multiply
        assert torch.equal(value, want) or torch.equal(value.isnan(), want.isnan())
        assert not value[~kept[0]].any()
    sparse = MaskSet([torch.tensor([True] + [False] * 99)], like=[torch.zeros(100)], budget=8)
    assert _forms(sparse) == ["index"]
    strided = _specials((200,))[::2]  # not contiguous: the kept positions cannot be used, the bits can
    sparse.zero_([strided])
    assert not strided[1:].any()


def test_enforcer_masks_gradients_and_hooks_optimizers():
    from lightning_snip.enforcement import Enforcer

    layer = torch.nn.Linear(6, 4)
    kept = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) < 0.3
    enforcer = Enforcer({"weight": layer.weight}, {"weight": kept})
    enforcer.zero_weights()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    enforcer.attach([optimizer], automatic=True)
    for _ in range(3):
        layer(torch.randn(8, 6)).sum().backward()
        enforcer.mask_gradients()
        assert not layer.weight.grad[~kept].any()
        optimizer.step()
        optimizer.zero_grad()
        assert not layer.weight[~kept].any()
    assert enforcer.repair() == {}
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert enforcer.repair() == {"weight": int((~kept).sum())}
    assert enforcer.rezero_every_step
    assert not layer.weight[~kept].any()
    enforcer.detach()
    assert not optimizer._optimizer_step_post_hooks


def test_enforcer_masks_every_gradient_with_one_prepared_multiply():
    from lightning_snip.enforcement import Enforcer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 300), torch.nn.ReLU(), torch.nn.Linear(300, 3))
    generator = torch.Generator().manual_seed(2)
    params = {"0.weight": net[0].weight, "2.weight": net[2].weight}
    kept = {name: torch.rand(p.shape, generator=generator) < 0.1 for name, p in params.items()}
    enforcer = Enforcer(params, kept)
    assert enforcer._batch is not None  # the prepared multiply, not the checked path
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    enforcer.attach([optimizer], automatic=True)
    for _ in range(2):
        net(torch.randn(8, 6)).square().sum().backward()
        assert net[0].weight.grad[~kept["0.weight"]].any()  # nothing masks them during backward
        enforcer.mask_gradients()
        for name, param in params.items():
            assert param.grad is not None
            assert param.grad[kept[name]].any()
            assert not param.grad[~kept[name]].any()
    assert enforcer.masked_backwards == 2
    enforcer.detach()
    assert not optimizer._optimizer_step_post_hooks


@pytest.mark.parametrize(
    ("dtypes", "budget", "prepared"),
    [
        ((torch.float32, torch.float32), 10**6, True),
        ((torch.bfloat16, torch.float64), 10**6, True),  # each tensor viewed as integers of its own width
        ((torch.float32, torch.float32), 8 * 20, False),  # kept positions: the checked path
        ((torch.float32, torch.float32), 0, False),  # the uint8 mask: the checked path
        ((torch.complex128, torch.float32), 10**6, False),  # no integer of complex128's width
    ],
)
def test_a_batch_zeroer_equals_zero_for_every_form(dtypes, budget, prepared):
    generator = torch.Generator().manual_seed(3)
    kept = [torch.rand(10, 10, generator=generator) < 0.1 for _ in dtypes]
    like = [torch.zeros(10, 10, dtype=dtype) for dtype in dtypes]
    masks = MaskSet(kept, like=like, budget=budget)
    zero = masks.batch_zeroer(like)
    assert (zero != masks.zero_) == prepared
    for dtype_of_call in (dtypes, (torch.float16,) * len(dtypes)):  # a dtype other than prepared: the checked path
        values = [
            _specials((10, 10), d) if d != torch.complex128 else torch.randn(10, 10, dtype=d) for d in dtype_of_call
        ]
        values[0] = values[0].t().contiguous().t()  # strided alike: a multiply follows each element's position
        want = [v.clone() for v in values]
        MaskSet(kept).zero_(want)
        zero(values)
        for value, expected, mask in zip(values, want, kept, strict=True):
            assert torch.equal(value.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8))
            assert not value[~mask].any()  # bit for bit, nan and -0.0 included; pruned entries exactly zero


def test_a_batch_zeroer_skips_missing_gradients_and_checks_what_it_is_given():
    kept = [torch.tensor([True, False]), torch.tensor([False, True, True])]
    like = [torch.zeros(2), torch.zeros(3)]
    zero = MaskSet(kept, like=like).batch_zeroer(like)
    second = torch.tensor([5.0, float("nan"), 7.0])
    zero([None, second])
    assert second.tolist()[0] == 0.0
    assert second.isnan().tolist() == [False, True, False]
    needs_grad = torch.tensor([1.0, 2.0], requires_grad=True)
    zero([needs_grad, torch.ones(3)])  # checked path, under no_grad: no in-place error on a leaf
    assert needs_grad.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="Got 1 tensors for 2 masks"):
        zero([torch.ones(2)])
    with pytest.raises(ValueError, match="Tensor 1 has shape"):
        MaskSet(kept).batch_zeroer([torch.zeros(2), torch.zeros(4)])


@pytest.mark.parametrize("fused", [False, True])  # one call per tensor (CPU), one foreach call (elsewhere)
def test_an_enforcer_masks_gradients_it_was_not_prepared_for_through_the_checked_path(fused):
    from lightning_snip.enforcement import Enforcer

    layers = [torch.nn.Linear(4, 4, bias=False) for _ in range(3)]
    params = {str(i): layer.weight for i, layer in enumerate(layers)}
    generator = torch.Generator().manual_seed(5)
    kept = {name: torch.rand(4, 4, generator=generator) < 0.5 for name in params}
    enforcer = Enforcer(params, kept)
    zeroing = enforcer._batch
    assert zeroing is not None
    assert not zeroing.fused  # CPU tensors: one call per tensor
    zeroing.fused = fused
    specials = _specials((4, 4), torch.float32)
    for broken in ("none", "dtype", None):  # the middle gradient missing, of another dtype, or all as prepared
        grads = [specials.clone() for _ in layers]
        if broken == "dtype":
            grads[1] = grads[1].double()
            layers[1].weight.data = layers[1].weight.data.double()
        for layer, grad in zip(layers, grads, strict=True):
            layer.weight.grad = grad
        if broken == "none":
            layers[1].weight.grad = None
        enforcer.mask_gradients()
        for name, layer in zip(params, layers, strict=True):
            grad = layer.weight.grad
            if grad is None:
                continue
            want = torch.where(kept[name], specials.to(grad.dtype), 0)
            assert torch.equal(grad.view(torch.uint8), want.view(torch.uint8))  # bit for bit; pruned exactly +0
        layers[1].weight.data = layers[1].weight.data.float()
    assert enforcer.masked_backwards == 3


def test_an_enforcer_with_its_prepared_multiply_pickles_and_masks_after_loading():
    import pickle

    from lightning_snip.enforcement import Enforcer

    layer = torch.nn.Linear(4, 3)
    kept = torch.rand(3, 4, generator=torch.Generator().manual_seed(4)) < 0.5
    loaded = pickle.loads(pickle.dumps(Enforcer({"weight": layer.weight}, {"weight": kept})))
    weight = loaded.params[0]
    weight.grad = torch.full((3, 4), float("inf"))
    loaded.mask_gradients()
    assert torch.equal(weight.grad == 0, ~kept)
