"""The ship path never silently differs: `sparsify`/`densify` keep modes, hooks and autocast; compressed dicts are
exact snapshots whose every key, value and tensor is checked."""

import copy
import io
import warnings
from collections import OrderedDict
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import BoringClassifier, fit
from torch import nn

from lightning_snip import (
    CompressedStateError,
    SNIPPruning,
    SparseLinear,
    compress_state_dict,
    decompress_state_dict,
    densify,
    load_compressed,
    save_compressed,
    sparsify,
)


def _pruned(*layers: nn.Module, zeros: float = 0.98, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(torch.rand_like(layer.weight) > zeros)
    return model


def _big_first() -> nn.Sequential:
    return _pruned(nn.Linear(1024, 1024, bias=False), nn.ReLU(), nn.BatchNorm1d(1024), nn.Linear(1024, 10))


# ------------------------------------------------------------------ sparsify / densify


def test_sparsify_leaves_the_input_model_exactly_as_it_was_modes_included():
    model = _big_first().train()
    model[2].eval()  # a deliberately frozen BatchNorm
    modes = [m.training for m in model.modules()]
    stats = model[2].running_mean.clone()
    fast = sparsify(model)
    assert [m.training for m in model.modules()] == modes
    assert isinstance(fast[0], SparseLinear)
    assert not any(m.training for m in fast.modules())
    model(torch.randn(8, 1024))  # the frozen BatchNorm still does not update its statistics
    assert torch.equal(model[2].running_mean, stats)


def test_backward_through_a_bias_free_first_sparse_layer_raises():
    fast = sparsify(_big_first())
    x = torch.randn(4, 1024)  # an input that does not require grad, into a layer without bias
    out = fast(x)
    assert out.requires_grad  # the later dense layer's parameters require grad, as in the dense model
    with pytest.raises(RuntimeError, match="for inference only"):
        out.sum().backward()


def test_forward_hooks_and_pre_hooks_of_a_replaced_layer_still_run():
    model = _big_first().eval()
    calls = []
    model[0].register_forward_pre_hook(lambda mod, args: (args[0] + 1,))
    model[0].register_forward_hook(lambda mod, args, out: out * 2)
    model[0].register_forward_hook(lambda mod, args, kwargs, out: calls.append(1), with_kwargs=True)
    fast = sparsify(model, example_input=torch.randn(1, 1024))
    fast[0] = (
        fast[0] if isinstance(fast[0], SparseLinear) else SparseLinear(fast[0])
    )  # the sparse path, measured or not
    x = torch.randn(4, 1024)
    calls.clear()
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # once in each model
    back = densify(fast)
    torch.testing.assert_close(back(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 4


def test_a_sparsified_model_runs_under_cpu_autocast_close_to_the_dense_model():
    model = _big_first().eval()
    fast = sparsify(model)
    assert isinstance(fast[0], SparseLinear)
    x = torch.randn(4, 1024)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense, sparse = model(x), fast(x)
    assert sparse.dtype == dense.dtype == torch.bfloat16
    torch.testing.assert_close(sparse.float(), dense.float(), rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)  # and exact again outside autocast


class KeywordCaller(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1024, 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(input=x)


def test_an_example_input_reaches_layers_called_with_a_keyword_argument():
    model = KeywordCaller().eval()
    with torch.no_grad():
        model.fc.weight.mul_(torch.rand(1024, 1024) > 0.99)
    x = torch.randn(2, 1024)
    fast = sparsify(model, example_input=x)  # measured: sparse or dense, never an IndexError
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    layer = SparseLinear(model.fc)
    torch.testing.assert_close(layer(input=x), model.fc(input=x), rtol=1e-5, atol=1e-5)


def test_the_deprecated_weight_norm_is_refused_with_what_to_do():
    with pytest.warns(FutureWarning):
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(600, 600)))
    with pytest.raises(TypeError, match=r"module '0'.*remove_weight_norm.*parametrizations\.weight_norm"):
        sparsify(model)
    nn.utils.remove_weight_norm(model[0])
    assert type(sparsify(model)[0]) in (nn.Linear, SparseLinear)  # folded in, it is an ordinary model


def test_densify_gives_linears_in_the_mode_of_the_model_with_their_own_bias():
    fast = sparsify(_pruned(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)))
    back = densify(fast)
    assert type(back[0]) is nn.Linear
    assert not any(m.training for m in back.modules())
    assert back[0].bias is not fast[0].bias
    assert back[0].bias.data_ptr() != fast[0].bias.data_ptr()
    fast[0].train()
    assert fast[0].to_linear().training


class FakeClock:
    """Timings the measurement reads: each timer made gets the next series (dense, then a kernel, per kernel)."""

    def __init__(self, *series: list[float]) -> None:
        self.series = [iter(s) for s in series]
        self.made = 0

    def __call__(self, fn: Any, device: torch.device) -> Any:
        series = self.series[self.made] if self.made < len(self.series) else iter(())
        self.made += 1

        def run() -> float:
            fn()
            return next(series, 1.0)  # the whole-model check after the per-layer ones: no faster, no slower

        return run


@pytest.mark.parametrize(
    ("dense", "sparse", "goes_sparse"),
    [
        ([1.0] * 16, [2.0] * 16, False),  # slower every time
        ([1.0] * 16, [0.95] * 16, False),  # faster, but not by the 0.9 margin
        ([1.0] * 16, [0.1] + [2.0] * 15, False),  # the first timed sample is fast, the median is slow
        ([1.0] + [1.0] * 15, [9.0, 9.0] + [0.5] * 14, True),  # a slow warm-up and first sample, a fast median
    ],
    ids=["slower", "within-margin", "first-sample-fast", "median-fast"],
)
def test_the_measured_choice_follows_the_medians_and_never_picks_a_slower_kernel(
    monkeypatch, dense, sparse, goes_sparse
):
    from lightning_snip import inference

    monkeypatch.setattr(inference, "numba_available", lambda: False)  # one sparse kernel: MKL CSR
    monkeypatch.setattr(inference, "_timer", FakeClock([0.0, *dense], [0.0, *sparse]))
    model = _pruned(nn.Linear(1024, 1024), zeros=0.99).eval()
    fast = sparsify(model, example_input=torch.randn(1, 1024))
    assert isinstance(fast[0], SparseLinear) is goes_sparse


@pytest.mark.parametrize(
    ("csr", "numba", "chosen"),
    [([0.5] * 16, [0.3] * 16, "numba"), ([0.3] * 16, [0.5] * 16, "csr"), ([2.0] * 16, [1.5] * 16, None)],
    ids=["numba-fastest", "csr-fastest", "both-slower"],
)
def test_the_fastest_measured_kernel_is_chosen(monkeypatch, csr, numba, chosen):
    from lightning_snip import inference

    dense = [0.0] + [1.0] * 16
    monkeypatch.setattr(inference, "_timer", FakeClock(dense, [0.0, *csr], list(dense), [0.0, *numba]))
    model = _pruned(nn.Linear(1024, 1024), zeros=0.99).eval()
    fast = sparsify(model, example_input=torch.randn(1, 1024))
    assert (fast[0].kernel if isinstance(fast[0], SparseLinear) else None) == chosen


# ------------------------------------------------------------------ compressed state dicts


def test_a_compressed_dict_is_a_snapshot_with_no_aliasing_either_way(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    compressed = compress_state_dict(model.state_dict())
    assert compressed["entries"]["0.bias"]["form"] == "dense"
    with torch.no_grad():  # keep training after compressing
        for p in model.parameters():
            p.add_(1.0)
    model[1].num_batches_tracked += 5
    path = tmp_path / "later.pt"
    torch.save(compressed, path)
    restored = load_compressed(path)  # its own checksums still hold
    restored["0.bias"].add_(100.0)  # writing to the restored dict ...
    restored["1.num_batches_tracked"].add_(100)
    assert float(model[0].bias.abs().max()) < 50
    assert int(model[1].num_batches_tracked) == 5
    again = decompress_state_dict(compressed)
    again["0.bias"].add_(1.0)
    assert not torch.equal(decompress_state_dict(compressed)["0.bias"], again["0.bias"])


def _saved(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _rename_in_file(compressed: dict, old: str, new: str) -> dict:
    raw = _saved(compressed).getvalue()
    assert raw.count(old.encode()) == 1
    return torch.load(io.BytesIO(raw.replace(old.encode(), new.encode())), weights_only=True)


def test_a_damaged_key_name_or_plain_value_is_refused():
    compressed = compress_state_dict({"layer1.weight": torch.zeros(4, 4), "layer2.weight": torch.ones(4, 4)})
    renamed = copy.deepcopy(compressed)
    renamed["entries"] = {("layer3.weight" if k == "layer1.weight" else k): v for k, v in compressed["entries"].items()}
    with pytest.raises(CompressedStateError, match="keys, plain values or structure"):
        decompress_state_dict(renamed)
    changed = compress_state_dict({"w": torch.zeros(2), "epoch": 7})
    changed["entries"]["epoch"]["value"] = 8
    with pytest.raises(CompressedStateError, match="checksum"):
        decompress_state_dict(changed)
    metadata = OrderedDict(w=torch.zeros(2))
    metadata._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    with_metadata = compress_state_dict(metadata)
    with_metadata["metadata"][""]["version"] = 2
    with pytest.raises(CompressedStateError, match="checksum"):
        decompress_state_dict(with_metadata)


def test_one_damaged_byte_of_a_key_in_a_file_is_refused():
    compressed = compress_state_dict({"encoder.weight": torch.zeros(4, 4), "decoder.weight": torch.ones(4, 4)})
    damaged = _rename_in_file(compressed, "encoder.weight", "encoder.weighs")
    with pytest.raises(CompressedStateError, match="checksum"):
        decompress_state_dict(damaged)


FLOAT8 = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")]


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_float8_tensors_round_trip_bit_for_bit(dtype):
    bits = torch.randint(0, 256, (64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    bits[torch.rand(64, 64, generator=torch.Generator().manual_seed(1)) < 0.9] = 0
    bits[0, :4] = torch.tensor([0x80, 0x00, 0x7F, 0xFF], dtype=torch.uint8)  # -0.0 (or nan), +0, nan/max, -nan/-max
    t = bits.view(dtype)
    compressed = compress_state_dict({"w": t})
    assert compressed["entries"]["w"]["form"] != "dense"  # 90% zeros: stored compactly
    restored = decompress_state_dict(torch.load(_saved(compressed), weights_only=True))["w"]
    assert restored.dtype == dtype
    assert torch.equal(restored.view(torch.uint8), bits)


def test_complex_tensors_and_conjugate_views_round_trip_exactly():
    z = torch.randn(3, 4, dtype=torch.complex64)
    state = {"conj": z.conj(), "neg": torch.randn(3, 4, dtype=torch.complex128)._neg_view(), "plain": z}
    restored = decompress_state_dict(torch.load(_saved(compress_state_dict(state)), weights_only=True))
    for key, value in state.items():
        assert not restored[key].is_conj()
        assert not restored[key].is_neg()
        assert torch.equal(restored[key], value.resolve_conj().resolve_neg()), key


def test_quantized_meta_and_subclassed_tensors_are_refused_naming_key_and_dtype():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the quantized creation functions are deprecated in newer torch
        q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.quint8)
    with pytest.raises(TypeError, match=r"state_dict\['q'\]` is a quantized tensor \(torch.quint8\)"):
        compress_state_dict({"q": q})
    with pytest.raises(TypeError, match=r"state_dict\['m'\]` is a torch.float32 tensor on the meta device"):
        compress_state_dict({"m": torch.empty(3, device="meta")})

    class Tagged(torch.Tensor):
        pass

    with pytest.raises(TypeError, match=r"state_dict\['t'\]` is a Tagged \(torch.float32\)"):
        compress_state_dict({"t": torch.zeros(3).as_subclass(Tagged)})


def test_an_optimizer_state_dict_round_trips_with_its_integer_keys():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(64, 64) > 0.9)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    restored = decompress_state_dict(torch.load(_saved(compress_state_dict(state)), weights_only=True))
    assert list(restored["state"]) == [0, 1, 2, 3]
    assert restored["param_groups"] == state["param_groups"]
    for index, values in state["state"].items():
        for key, value in values.items():
            assert torch.equal(restored["state"][index][key], value)
    fresh = torch.optim.Adam(model.parameters())
    fresh.load_state_dict(restored)  # loads as the optimizer's own


class HyperModule(BoringClassifier):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()


def test_a_whole_lightning_checkpoint_shrinks_and_round_trips(tmp_path):
    model = HyperModule()
    trainer = fit(model, [SNIPPruning(sparsity=0.9, plot=False)], max_steps=2)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    size = save_compressed(checkpoint, tmp_path / "last.compressed.pt")
    restored = load_compressed(tmp_path / "last.compressed.pt")
    assert list(restored) == list(checkpoint)
    assert size > 0
    assert restored["hyper_parameters"] == checkpoint["hyper_parameters"]
    assert restored["loops"] == checkpoint["loops"] or _same(restored["loops"], checkpoint["loops"])
    assert _same(restored["optimizer_states"], checkpoint["optimizer_states"])
    assert _same(restored["callbacks"], checkpoint["callbacks"])
    assert _same(restored["state_dict"], checkpoint["state_dict"])
    resumed = HyperModule()
    resumed.load_state_dict(restored["state_dict"])
    again = pl.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        max_steps=3,
    )
    torch.save(restored, tmp_path / "restored.ckpt")
    again.fit(
        resumed,
        torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(32, 16), torch.randint(0, 4, (32,))), batch_size=16
        ),
        ckpt_path=tmp_path / "restored.ckpt",
    )
    assert again.global_step == 3


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(b, dict):
        return type(a) is type(b) and list(a) == list(b) and all(_same(a[k], b[k]) for k in b)
    if isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_what_cannot_be_stored_is_refused_with_the_true_reason():
    from argparse import Namespace

    with pytest.raises(TypeError, match=r"state_dict\['hparams'\]` is a Namespace.*vars\(namespace\)"):
        compress_state_dict({"hparams": Namespace(lr=0.1)})
    with pytest.raises(TypeError, match=r"state_dict\['opt'\]\['state'\]` has a key \(1, 2\) of type tuple"):
        compress_state_dict({"opt": {"state": {(1, 2): torch.zeros(1)}}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_sparsified_model_runs_under_cuda_autocast():
    model = _big_first().eval().cuda()
    fast = sparsify(model)
    x = torch.randn(4, 1024, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        dense, sparse = model(x), fast(x)
    assert sparse.dtype == dense.dtype == torch.float16
    torch.testing.assert_close(sparse.float(), dense.float(), rtol=2e-2, atol=2e-2)


def test_sparse_layers_that_slow_the_whole_model_down_go_back_to_dense(monkeypatch, caplog):
    import logging

    from lightning_snip import inference

    model = _pruned(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), zeros=0.99).eval()
    monkeypatch.setattr(inference, "_measured_faster", lambda layer, sparse, x, rounds=15: (True, 0.5))
    ratios = iter([1.3, 0.8])  # slower with every chosen layer; faster without the compiled-kernel ones
    monkeypatch.setattr(inference, "_whole_model_ratio", lambda model, swaps, x, rounds=15: next(ratios))
    with caplog.at_level(logging.INFO, logger="lightning_snip.inference"):
        fast = sparsify(model, example_input=torch.randn(1, 1024))
    kernels = [m.kernel for m in fast.modules() if isinstance(m, inference._SparseMatrix)]
    assert kernels == ["csr", "csr"] or kernels == []  # numba (chosen first when equally fast) went back to dense
    assert "whole model measured at 1.30x" in caplog.text
    monkeypatch.setattr(inference, "_whole_model_ratio", lambda model, swaps, x, rounds=15: 1.2)
    slow = sparsify(model, example_input=torch.randn(1, 1024))
    assert not any(isinstance(m, inference._SparseMatrix) for m in slow.modules())  # never slower than dense


def test_the_whole_model_check_times_both_configurations_interleaved():
    from lightning_snip import inference

    model = _pruned(nn.Linear(1024, 1024), zeros=0.99).eval()
    sparse = SparseLinear(model[0], "csr")
    ratio = inference._whole_model_ratio(model, [(model, "0", model[0], sparse)], torch.randn(1, 1024), rounds=3)
    assert 0.01 < ratio < 100
    assert type(model[0]) is nn.Linear  # left dense: `sparsify` makes the swap it decides on
