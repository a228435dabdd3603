"""`sparsify`/`densify`: sparse kernels where they are faster, the same outputs, inference only, and back."""

import copy
import itertools
import logging
import time

import pytest
import torch
from helpers import BoringClassifier, fit
from torch import nn

import lightning_snip.inference as inference
from lightning_snip import SNIPPruning, SparseLinear, densify, sparsify


def _prune_(layer: nn.Module, zeros: float, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(layer.weight.shape, generator=g) >= zeros)
    return layer


def _mlp(zeros: float = 0.97) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        _prune_(nn.Linear(1024, 512), zeros),  # 524,288 weights: above the rule's size
        nn.ReLU(),
        _prune_(nn.Linear(512, 300), zeros),  # 153,600 weights: below it
        nn.ReLU(),
        nn.Linear(300, 10),  # dense
    )


def test_the_rule_decides_without_an_example_and_the_outputs_match():
    model = _mlp().train()
    fast = sparsify(model)
    assert [type(m).__name__ for m in fast] == ["SparseLinear", "ReLU", "Linear", "ReLU", "Linear"]
    assert fast[0].weight.layout == torch.sparse_csr
    assert fast[0].kernel == "csr"
    assert model.training
    assert not fast.training
    assert type(model[0]) is nn.Linear
    for shape in [(1, 1024), (64, 1024), (3, 5, 1024)]:
        x = torch.randn(shape)
        expected = model(x)
        with torch.inference_mode():
            got = fast(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), expected, rtol=1e-5, atol=1e-5)


def test_the_rule_thresholds():
    big = nn.Linear(1024, 256)  # exactly MIN_WEIGHTS
    assert big.weight.numel() == inference.MIN_WEIGHTS
    assert isinstance(sparsify(nn.Sequential(_prune_(big, 0.96)))[0], SparseLinear)
    assert type(sparsify(nn.Sequential(_prune_(nn.Linear(1024, 256), 0.90)))[0]) is nn.Linear  # too few zeros
    assert type(sparsify(nn.Sequential(_prune_(nn.Linear(1000, 256), 0.99)))[0]) is nn.Linear  # too small
    assert type(sparsify(nn.Sequential(nn.Linear(1024, 1024)))[0]) is nn.Linear  # no zeros


class _ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_convolutions_subclasses_and_other_dtypes_stay_as_they_were():
    conv = _prune_(nn.Conv2d(64, 64, 3), 0.99)
    sub = _prune_(_ScaledLinear(1024, 1024), 0.99)
    half = _prune_(nn.Linear(1024, 1024), 0.99).to(torch.bfloat16)  # no CPU sparse kernel for bfloat16
    fast = sparsify(nn.ModuleDict({"conv": conv, "sub": sub, "bf16": half}))
    assert type(fast["conv"]) is nn.Conv2d
    assert type(fast["sub"]) is _ScaledLinear
    assert type(fast["bf16"]) is nn.Linear


def test_a_shared_layer_is_replaced_once_everywhere():
    shared = _prune_(nn.Linear(1024, 1024), 0.99)
    fast = sparsify(nn.Sequential(shared, nn.ReLU(), shared))
    assert isinstance(fast[0], SparseLinear)
    assert fast[0] is fast[2]


def test_the_example_input_measures_each_layer_on_the_shapes_it_sees(monkeypatch, caplog):
    model = _mlp()
    seen = {}

    def fake_measure(layer, sparse, x, rounds=15):
        seen[layer.out_features] = tuple(x.shape)
        return layer.out_features == 300, 0.5 if layer.out_features == 300 else 1.3  # only the middle layer wins

    monkeypatch.setattr(inference, "_measured_faster", fake_measure)
    monkeypatch.setattr(inference, "_whole_model_ratio", lambda model, swaps, x, rounds=15: 0.8)
    with caplog.at_level(logging.INFO, logger="lightning_snip.inference"):
        fast = sparsify(model, example_input=torch.randn(7, 1024))
    assert seen == {512: (7, 1024), 300: (7, 512)}  # the dense last layer has nothing to skip
    assert [type(m).__name__ for m in fast] == ["Linear", "ReLU", "SparseLinear", "ReLU", "Linear"]
    assert "0 -> dense (97.0% zeros, measured csr 1.30x" in caplog.text  # and numba's, when installed
    assert "2 -> sparse csr" in caplog.text  # the first of equally fast kernels
    assert "4 -> dense (0.0% zeros, nothing to skip)" in caplog.text


def test_the_measurement_interleaves_and_compares_medians():
    calls = []

    class Slow(nn.Module):
        def forward(self, x):
            calls.append("dense")
            time.sleep(0.002)
            return x

    class Fast(nn.Module):
        def forward(self, x):
            calls.append("sparse")
            return x

    faster, ratio = inference._measured_faster(Slow(), Fast(), torch.zeros(1), rounds=5)
    assert faster
    assert ratio < inference.MEASURED_MARGIN
    # a warm-up call each, a call each to size the blocks, then 5 rounds of interleaved blocks: the 2 ms layer fills
    # 5 ms with 2 calls, the fast one makes many more (up to 100), the same number in every round
    blocks = [(name, len(list(group))) for name, group in itertools.groupby(calls[4:])]
    assert calls[:4] == ["dense", "sparse"] * 2
    dense_calls, fast_calls = blocks[0][1], blocks[1][1]
    assert dense_calls in (1, 2)  # 2 unless a sleep overran
    assert dense_calls < fast_calls <= 100
    assert blocks == [("dense", dense_calls), ("sparse", fast_calls)] * 5
    slower, ratio = inference._measured_faster(Fast(), Slow(), torch.zeros(1), rounds=5)
    assert not slower
    assert ratio > 1


def test_each_layer_is_measured_on_the_input_the_layers_before_it_hand_on(monkeypatch, caplog):
    model = _mlp().eval()
    model[4] = _prune_(model[4], 0.5)  # the last layer has zeros too: three layers to measure
    measured: list[tuple[int, bool, tuple[int, ...]]] = []

    def fake_measure(layer, sparse, x, rounds=15):
        measured.append((layer.out_features, x.is_contiguous(), tuple(x.shape)))
        wins = layer.out_features == 512 or (layer.out_features == 10 and not x.is_contiguous())
        return wins, 0.5 if wins else 1.2

    monkeypatch.setattr(inference, "_measured_faster", fake_measure)
    monkeypatch.setattr(inference, "_whole_model_ratio", lambda model, swaps, x, rounds=15: 0.8)
    with caplog.at_level(logging.INFO, logger="lightning_snip.inference"):
        fast = sparsify(model, example_input=torch.randn(64, 1024))
    by_layer = {out: contiguous for out, contiguous, _ in measured}
    # the first layer goes sparse (CSR: its result is a transposed view), so the second is measured on that layout;
    # the second stays dense and hands on a contiguous result again ... which the last layer is measured on
    assert by_layer == {512: True, 300: False, 10: True}
    assert {shape for *_, shape in measured} == {(64, 1024), (64, 512), (64, 300)}
    assert [type(m).__name__ for m in fast] == ["SparseLinear", "ReLU", "Linear", "ReLU", "Linear"]
    # measured in the order they run, not the order they are declared
    assert list(dict.fromkeys(out for out, *_ in measured)) == [512, 300, 10]
    with torch.no_grad():
        x = torch.randn(64, 1024)
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_model_that_is_one_layer_is_replaced_too(monkeypatch):
    layer = _prune_(nn.Linear(1024, 1024), 0.99).eval()
    monkeypatch.setattr(inference, "_measured_faster", lambda *args, **kwargs: (True, 0.2))
    monkeypatch.setattr(inference, "_whole_model_ratio", lambda model, swaps, x, rounds=15: 0.3)
    x = torch.randn(1, 1024)
    fast = sparsify(layer, example_input=x)
    assert type(fast) is SparseLinear
    assert type(sparsify(layer)) is SparseLinear  # the rule too: 99% zeros, 1,048,576 weights
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x), rtol=1e-5, atol=1e-5)
    back = densify(fast)
    assert type(back) is nn.Linear
    assert torch.equal(back.weight, layer.weight)
    assert type(layer) is nn.Linear  # the input model is never changed
    monkeypatch.setattr(inference, "_whole_model_ratio", lambda model, swaps, x, rounds=15: 1.1)
    assert type(sparsify(layer, example_input=x)) is nn.Linear  # slower as a whole: stays dense


def test_a_layer_the_example_does_not_reach_stays_dense(monkeypatch):
    monkeypatch.setattr(inference, "_measured_faster", lambda *args, **kwargs: (True, 0.1))  # the reach, not timing

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = _prune_(nn.Linear(2048, 2048), 0.99), _prune_(nn.Linear(2048, 2048), 0.99)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    fast = sparsify(Branchy(), example_input=(torch.randn(64, 2048),))
    assert isinstance(fast.used, SparseLinear)
    assert type(fast.unused) is nn.Linear


def test_a_backward_through_a_sparse_layer_raises_a_clear_error():
    fast = sparsify(_mlp())
    x = torch.randn(4, 1024, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"for inference only.*lightning_snip.densify"):
        fast(x).sum().backward()
    with pytest.raises(RuntimeError, match=r"for inference only"):  # the bias alone needs a gradient
        fast(torch.randn(4, 1024)).sum().backward()


def test_densify_gives_back_the_ordinary_trainable_model():
    model = _mlp()
    back = densify(sparsify(model))
    assert all(type(m) is type(n) for m, n in zip(back, model, strict=True))
    for (name, p), q in zip(back.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert p.requires_grad, name
    back(torch.randn(2, 1024)).sum().backward()
    assert back[0].weight.grad is not None
    assert isinstance(SparseLinear(model[0]).to_linear(), nn.Linear)


def test_state_dicts_cross_between_the_sparse_and_the_dense_model():
    model = _mlp()
    fast = sparsify(model)
    state = fast.state_dict()
    assert list(state) == list(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    fresh = _mlp(zeros=0.5)
    fresh.load_state_dict(state, strict=True)
    changed = _mlp(zeros=0.99)
    fast.load_state_dict(changed.state_dict(), strict=True)  # the sparse layer takes the new weights, still CSR
    assert fast[0].weight.layout == torch.sparse_csr
    assert torch.equal(fast[0].dense_weight(), changed[0].weight)
    with pytest.raises(RuntimeError, match="Missing key"):
        fast.load_state_dict({k: v for k, v in changed.state_dict().items() if k != "0.weight"})


def test_copies_and_pickles(tmp_path):
    fast = sparsify(_mlp())
    x = torch.randn(3, 1024)
    twin = copy.deepcopy(fast)
    assert twin[0] is not fast[0]
    assert twin[0].weight.layout == torch.sparse_csr
    torch.testing.assert_close(twin(x), fast(x))
    assert isinstance(sparsify(fast)[0], SparseLinear)  # sparsifying again copies and keeps the sparse layer
    torch.save(fast, tmp_path / "fast.pt")
    loaded = torch.load(tmp_path / "fast.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), fast(x))


def test_moves_and_casts():
    fast = sparsify(_mlp()).to(torch.float64)
    assert fast[0].weight.dtype == torch.float64
    assert fast[0].weight.layout == torch.sparse_csr
    x = torch.randn(3, 1024, dtype=torch.float64)
    torch.testing.assert_close(fast(x), _mlp().double()(x))
    fast.half()
    with pytest.raises(RuntimeError, match=r"holds a torch.float16 weight on cpu.*densify"):
        fast(x.half())
    with pytest.raises(TypeError, match=r"got a torch\.float32 input for its torch\.float64 weight"):
        sparsify(_mlp()).double()(torch.randn(2, 1024))


def test_a_transformer_layer_in_eval_mode_takes_the_standard_path_with_the_same_outputs():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True).eval()
    _prune_(layer.linear1, 0.97), _prune_(layer.linear2, 0.97)
    fast = sparsify(layer)
    assert isinstance(fast.linear1, SparseLinear)
    assert isinstance(fast.linear2, SparseLinear)
    x = torch.randn(2, 10, 256)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), layer(x), rtol=1e-4, atol=1e-5)


def test_a_model_pruned_by_the_callback_runs_sparse():
    class Wide(BoringClassifier):
        def __init__(self) -> None:
            super().__init__(features=1024, dropout=0.0)
            self.net[0] = nn.Linear(1024, 1024)
            self.net[1] = nn.BatchNorm1d(1024)
            self.net[4] = nn.Linear(1024, 4)

    torch.manual_seed(0)
    model = Wide()
    data = torch.utils.data.TensorDataset(torch.randn(32, 1024), torch.randint(0, 4, (32,)))
    fit(model, [SNIPPruning(sparsity=0.98, plot=False)], torch.utils.data.DataLoader(data, batch_size=16))
    fast = sparsify(model)
    assert isinstance(fast.net[0], SparseLinear)
    model.eval()
    x = torch.randn(5, 1024)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match=r"`model` must be an `nn\.Module`, got dict"):
        sparsify({})
    with pytest.raises(TypeError, match=r"`model` must be an `nn\.Module`"):
        densify(3)
    with pytest.raises(ValueError, match="`kernel` must be 'csr', 'numba', 'bsr' or '2:4', got 'coo'"):
        SparseLinear(nn.Linear(4, 4), kernel="coo")
    with pytest.raises(ValueError, match="2:4 `SparseLinear` needs a CUDA weight"):
        SparseLinear(nn.Linear(64, 64), kernel="2:4")


def test_is_two_four():
    w = torch.tensor([[1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    assert inference.is_two_four(w)
    w[0, 5] = 1.0
    w[0, 6] = 1.0
    w[0, 7] = 1.0
    assert not inference.is_two_four(w)
    assert not inference.is_two_four(torch.zeros(2, 6))  # rows not a multiple of 4


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_csr_on_cuda_matches_dense():
    model = _mlp().cuda()
    fast = sparsify(model)
    assert isinstance(fast[0], SparseLinear)
    assert fast[0].weight.is_cuda
    x = torch.randn(8, 1024, device="cuda")
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0), reason="needs compute capability 8.0"
)
def test_two_four_semi_structured_on_cuda_matches_dense_and_moves_to_the_cpu_as_csr():
    torch.manual_seed(0)
    layer = nn.Linear(1024, 1024).half().cuda()
    with torch.no_grad():
        keep = torch.zeros(1024, 256, 4, dtype=torch.bool, device="cuda")
        keep[..., :2] = True
        layer.weight.mul_(keep.view(1024, 1024))
    fast = sparsify(nn.Sequential(layer))
    assert fast[0].kernel == "2:4"
    x = torch.randn(64, 1024, device="cuda", dtype=torch.half)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), layer(x), rtol=1e-2, atol=1e-2)
    moved = fast.float().cpu()
    assert moved[0].kernel == "csr"
