"""The compiled batch-1 kernel, constant fan-in masks and sparse 1x1 convolutions: outputs equal the dense model's."""

import builtins
import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from lightning_snip import SNIPPruning, densify, select_masks, sparsify
from lightning_snip.inference import SparseConv1x1, SparseLinear, block_size, is_pointwise_conv
from lightning_snip.kernels import RowKernel
from lightning_snip.selection import kept_count, select_constant_fan_in

DTYPES = [torch.float32, torch.float64]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())))


def _pruned_linear(dtype: torch.dtype, bias: bool = True, constant: bool = False) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(300, 200, bias=bias).to(dtype)
    scores = torch.rand(200, 300)
    kept = select_constant_fan_in({"w": scores}, 0.95)["w"] if constant else scores > 0.95
    with torch.no_grad():
        layer.weight.mul_(kept.to(dtype))
    return layer


def _equals_on_every_input_shape(sparse: nn.Module, layer: nn.Linear, dtype: torch.dtype) -> None:
    """The sparse layer's outputs equal the dense layer's for batches of 1 and 64, 3-D and unbatched inputs."""
    n = layer.in_features
    for shape in [(1, n), (64, n), (2, 5, n), (n,)]:
        x = torch.randn(shape, dtype=dtype)
        with torch.no_grad():
            _close(sparse(x), layer(x))
    assert torch.equal(sparse.state_dict()["weight"], layer.weight)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("constant", [False, True], ids=["csr", "constant-fan-in"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_the_compiled_kernel_equals_the_dense_layer(dtype, constant, bias):
    layer = _pruned_linear(dtype, bias, constant)
    sparse = SparseLinear(layer, "numba")
    assert sparse._rows is not None
    assert sparse._rows.layout == ("constant fan-in" if constant else "csr")
    _equals_on_every_input_shape(sparse, layer, dtype)
    x = torch.randn(4, 300, dtype=dtype)
    with torch.no_grad():
        _close(pickle.loads(pickle.dumps(sparse))(x), layer(x))
        _close(copy.deepcopy(sparse)(x), layer(x))


@pytest.mark.parametrize("columns", [300, 1 << 16, (1 << 16) + 1])
def test_the_compiled_kernel_reads_16_bit_columns_where_they_fit(columns):
    torch.manual_seed(0)
    weight = torch.zeros(3, columns)
    weight[:, [0, 1, columns // 2, columns - 2, columns - 1]] = torch.randn(3, 5)  # the last column included
    rows = RowKernel(weight)
    assert rows.indices.dtype == (np.uint16 if columns <= 1 << 16 else np.int32)
    assert int(rows.indices.max()) == columns - 1
    for n in (1, 7):
        x_t = torch.randn(columns, n)
        _close(rows(x_t), weight @ x_t)


def test_the_compiled_kernel_follows_torch_threads_and_leaves_them_alone():
    layer = _pruned_linear(torch.float32)
    sparse = SparseLinear(layer, "numba")
    x = torch.randn(1, 300)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                results.append(sparse(x))
                results.append(sparse(torch.randn(5, 300)))
            assert torch.get_num_threads() == n  # the kernel's thread pool does not change PyTorch's
            if n > 1:
                assert sparse._rows.numba.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)
    _close(results[0], results[2])
    assert sparse._rows.numba.threading_layer() == "workqueue"  # not the OpenMP runtime PyTorch uses


def test_a_compiled_weight_moves_to_cuda_as_csr_and_back_to_the_kernel(monkeypatch):
    sparse = SparseLinear(_pruned_linear(torch.float32), "numba")
    as_double = sparse.double()
    assert as_double.kernel == "numba"
    assert as_double._rows.dtype == torch.float64
    x = torch.randn(2, 300, dtype=torch.float64)
    with torch.no_grad():
        _close(as_double(x), densify(nn.Sequential(as_double))[0](x))


def test_missing_numba_is_an_error_naming_the_extra(monkeypatch):
    from lightning_snip import inference, kernels

    real_import = builtins.__import__

    def no_numba(name, *args, **kwargs):
        if name == "numba":
            raise ImportError("No module named 'numba'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(builtins, "__import__", no_numba)
    assert not kernels.numba_available()
    with pytest.raises(ImportError, match=r'pip install "lightning-snip\[fast\]"'):
        RowKernel(torch.zeros(2, 2))
    assert inference._kernels_for(torch.zeros(4, 4), conv=False) == ["csr"]  # sparsify falls back to MKL CSR


# ------------------------------------------------------------------ constant fan-in masks


@pytest.mark.parametrize("sparsity", [0.9, 0.95, 0.98])
def test_constant_fan_in_counts_are_exact_per_row_and_follow_global_selection(sparsity):
    g = torch.Generator().manual_seed(0)
    scores = {
        "a": torch.rand(64, 128, generator=g),
        "b": torch.rand(32, 3, 3, 3, generator=g) * 3,
        "c": torch.rand(10, 64, generator=g) * 0.1,
    }
    global_counts = {n: int(m.sum()) for n, m in select_masks(scores, sparsity, "global").items()}
    masks = select_masks(scores, sparsity, "constant_fan_in")
    for name, mask in masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        per_row = rows.sum(1)
        k = min(rows.shape[1], max(1, round(global_counts[name] / rows.shape[0])))
        assert bool((per_row == k).all()), name  # every output unit keeps the same number of inputs
        assert int(mask.sum()) == k * rows.shape[0]
        s = scores[name].reshape(rows.shape)
        kept_min = torch.where(rows, s, torch.inf).min(1).values
        pruned_max = torch.where(rows, -torch.inf, s).max(1).values
        assert bool((kept_min >= pruned_max).all()), name  # each row keeps its own best
    assert abs(sum(int(m.sum()) for m in masks.values()) - kept_count(64 * 128 + 32 * 27 + 640, sparsity)) <= 106


def test_constant_fan_in_through_the_callback_gives_the_compiled_layout():
    from helpers import BoringClassifier, fit

    model = BoringClassifier(dropout=0.0)
    pruning = SNIPPruning(sparsity=0.75, scope="constant_fan_in", plot=False)
    fit(model, [pruning], max_steps=2)
    for name, mask in pruning.masks.items():
        assert len(set(mask.sum(1).tolist())) == 1, name
    layer = SparseLinear(model.net[0].eval(), "numba")
    assert layer._rows.layout == "constant fan-in"
    with pytest.raises(ValueError, match=r"`shuffle=True` would break the row pattern of `scope='constant_fan_in'`"):
        SNIPPruning(scope="constant_fan_in", shuffle=True)


# ------------------------------------------------------------------ 1x1 convolutions


def _pruned_conv(dtype: torch.dtype, bias: bool = True) -> nn.Conv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 1, bias=bias).to(dtype)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) > 0.9)
    return conv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", ["csr", "numba", "bsr"])
def test_a_sparse_1x1_convolution_equals_the_dense_one(dtype, kernel):
    conv = _pruned_conv(dtype)
    if kernel == "bsr":  # whole 8x8 tiles of channels zero
        with torch.no_grad():
            conv.weight.copy_(torch.randn(128, 64, 1, 1, dtype=dtype) * _tiles(128, 64, 8, 0.2).view(128, 64, 1, 1))
    sparse = SparseConv1x1(conv, kernel)
    inputs = [
        torch.randn(1, 64, 7, 7, dtype=dtype),
        torch.randn(5, 64, 6, 4, dtype=dtype),
        torch.randn(2, 64, 5, 5, dtype=dtype).to(memory_format=torch.channels_last),
        torch.randn(64, 3, 3, dtype=dtype),  # unbatched
    ]
    for x in inputs:
        with torch.no_grad():
            _close(sparse(x), conv(x))
    assert torch.equal(sparse.state_dict()["weight"], conv.weight)
    back = sparse.to_conv()
    assert type(back) is nn.Conv2d
    assert torch.equal(back.weight, conv.weight)
    with pytest.raises(RuntimeError, match="for inference only"):
        sparse(inputs[0].requires_grad_()).sum().backward()


# ------------------------------------------------------------------ block-sparse weights


def _tiles(rows: int, cols: int, size: int, kept: float, seed: int = 0) -> torch.Tensor:
    """A ``(rows, cols)`` 0/1 mask made of ``size x size`` tiles, ``kept`` of them ones."""
    g = torch.Generator().manual_seed(seed)
    return (
        (torch.rand(rows // size, cols // size, generator=g) < kept)
        .repeat_interleave(size, 0)
        .repeat_interleave(size, 1)
    )


def test_block_size_finds_the_largest_tiling_and_refuses_scattered_zeros():
    torch.manual_seed(0)
    for size in (4, 8, 16, 32):
        assert block_size(torch.randn(256, 128) * _tiles(256, 128, size, 0.1)) == size
    # half-filled tiles still count; tiles that are mostly empty or a dense weight do not
    half = torch.randn(64, 64) * _tiles(64, 64, 8, 0.2) * (torch.arange(64) % 2 == 0)
    assert block_size(half) == 8
    assert block_size(torch.randn(256, 256) * (torch.rand(256, 256) > 0.95)) is None
    assert block_size(torch.randn(64, 64)) is None
    assert block_size(torch.zeros(64, 64)) is None
    # a tile size must divide both dimensions: 8x8 tiles in a 68-column weight leave only the 4x4 tiling
    odd = torch.zeros(64, 68)
    odd[:8, :8] = torch.randn(8, 8)
    assert block_size(odd) == 4
    assert block_size(torch.zeros(6, 6).index_fill_(0, torch.tensor([0]), 1.0)) is None
    transposed = (torch.randn(128, 256) * _tiles(128, 256, 8, 0.1)).t()  # a non-contiguous view
    assert block_size(transposed) == 8
    with pytest.raises(ValueError, match=r"`weight` must be 2-D, got shape \(2, 2, 2\)"):
        block_size(torch.ones(2, 2, 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_a_block_sparse_layer_equals_the_dense_one_and_keeps_its_tiles(dtype, bias):
    torch.manual_seed(0)
    layer = nn.Linear(256, 128, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.mul_(_tiles(128, 256, 16, 0.1).to(dtype))
    sparse = SparseLinear(layer, "bsr")
    assert sparse.weight.layout == torch.sparse_bsr
    assert sparse.block_size == 16
    assert "kernel='bsr', blocks=16x16" in repr(sparse)
    _equals_on_every_input_shape(sparse, layer, dtype)
    x = torch.randn(4, 256, dtype=dtype)
    with torch.no_grad():
        for copied in (pickle.loads(pickle.dumps(sparse)), copy.deepcopy(sparse)):
            assert copied.kernel == "bsr"
            assert copied.weight.layout == torch.sparse_bsr
            _close(copied(x), layer(x))
        # a cast keeps the kernel and the tiles; a load of other values keeps the tiling and multiplies them exactly
        other = torch.float64 if dtype == torch.float32 else torch.float32
        cast = copy.deepcopy(sparse).to(other)
        assert (cast.kernel, cast.block_size, cast.weight.layout) == ("bsr", 16, torch.sparse_bsr)
        _close(cast(x.to(other)), layer.to(other)(x.to(other)))
        layer.to(dtype)
        scattered = copy.deepcopy(layer)
        scattered.weight.copy_(torch.randn(128, 256, dtype=dtype) * (torch.rand(128, 256) > 0.5))
        sparse.load_state_dict(scattered.state_dict())
        assert sparse.weight.layout == torch.sparse_bsr
        _close(sparse(x), scattered(x))
    assert type(densify(nn.Sequential(sparse))[0]) is nn.Linear
    with pytest.raises(RuntimeError, match="for inference only"):
        sparse(x.requires_grad_()).sum().backward()


def test_bsr_without_tiles_is_refused_naming_the_fix():
    layer = _pruned_linear(torch.float32)  # scattered zeros
    with pytest.raises(ValueError, match=r"kernel='bsr' needs a weight whose zeros come in square tiles.*\(200, 300\)"):
        SparseLinear(layer, "bsr")
    tiled = nn.Linear(64, 64)
    with torch.no_grad():
        tiled.weight.mul_(_tiles(64, 64, 8, 0.2))
    with pytest.raises(ValueError, match="'bsr' or '2:4'"):
        SparseLinear(tiled, "coo")  # type: ignore[arg-type]
    conv = nn.Conv2d(64, 64, 1)
    with pytest.raises(ValueError, match="takes kernel 'csr', 'numba' or 'bsr', got '2:4'"):
        SparseConv1x1(conv, "2:4")


def test_sparsify_offers_bsr_only_for_tiled_layers_and_takes_it_when_measured_fastest(monkeypatch):
    from lightning_snip import inference

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU()).eval()
    with torch.no_grad():
        mlp[0].weight.mul_(_tiles(256, 256, 8, 0.05))  # tiles
        mlp[2].weight.mul_(torch.rand(256, 256) > 0.95)  # scattered
    timed: list[tuple[int, str]] = []
    speed = {"csr": 0.6, "numba": 0.5, "bsr": 0.3}

    def fake_measure(layer, sparse, x, rounds=15):
        timed.append((layer.out_features, sparse.kernel))
        return True, speed[sparse.kernel]

    monkeypatch.setattr(inference, "_measured_faster", fake_measure)
    monkeypatch.setattr(inference, "_whole_model_ratio", lambda model, swaps, x, rounds=15: 0.8)
    x = torch.randn(64, 256)
    fast = sparsify(mlp, example_input=x)
    assert {k for n, k in timed if n == 256} >= {"csr", "bsr"}
    assert sorted(k for _, k in timed).count("bsr") == 1  # only the tiled layer is offered BSR
    assert (fast[0].kernel, fast[2].kernel) == ("bsr", "numba")
    with torch.no_grad():
        _close(fast(x), mlp(x))
    speed["bsr"] = 0.7  # slower than another kernel: never taken
    assert sparsify(mlp, example_input=x)[0].kernel == "numba"
    big = nn.Linear(1024, 1024)
    with torch.no_grad():
        big.weight.mul_(_tiles(1024, 1024, 8, 0.04))
    assert sparsify(nn.Sequential(big))[0].kernel == "csr"  # the rule, without an example, stays with MKL CSR


def test_only_plain_1x1_convolutions_are_pointwise():
    assert is_pointwise_conv(nn.Conv2d(8, 8, 1))
    assert is_pointwise_conv(nn.Conv2d(8, 8, 1, padding="valid"))
    for conv in [
        nn.Conv2d(8, 8, 3),
        nn.Conv2d(8, 8, 1, stride=2),
        nn.Conv2d(8, 8, 1, padding=1),
        nn.Conv2d(8, 8, 1, groups=2),
        nn.Conv2d(8, 8, 1, dilation=2),
    ]:
        assert not is_pointwise_conv(conv)
        with pytest.raises(ValueError, match="1x1, stride-1, unpadded, ungrouped"):
            SparseConv1x1(conv)


def test_sparsify_measures_1x1_convolutions_and_densify_restores_them(monkeypatch):
    from lightning_snip import inference

    net = nn.Sequential(nn.Conv2d(64, 256, 1), nn.ReLU(), nn.Conv2d(256, 64, 3, padding=1), nn.Conv2d(64, 64, 1))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.rand_like(m.weight) > 0.95)
    net.eval()
    timed = []

    def fake_measure(layer, sparse, x, rounds=15):
        timed.append((type(layer).__name__, sparse.kernel, tuple(x.shape)))
        return True, 0.5 if sparse.kernel == "numba" else 0.7

    monkeypatch.setattr(inference, "_measured_faster", fake_measure)
    monkeypatch.setattr(inference, "_whole_model_ratio", lambda model, swaps, x, rounds=15: 0.8)
    x = torch.randn(1, 64, 8, 8)
    fast = sparsify(net, example_input=x)
    assert [type(m).__name__ for m in fast] == ["SparseConv1x1", "ReLU", "Conv2d", "SparseConv1x1"]
    assert {k for _, k, _ in timed} == {"csr", "numba"}
    assert fast[0].kernel == "numba"
    assert ("Conv2d", "csr", (1, 64, 8, 8)) in timed
    with torch.no_grad():
        _close(fast(x), net(x))
    assert type(sparsify(net)[0]) is nn.Conv2d  # without an example, convolutions stay dense
    back = densify(fast)
    assert [type(m) for m in back] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.Conv2d]
    with torch.no_grad():
        _close(back(x), net(x))


# ------------------------------------------------------------------ deploy files


def _pruned_mlp(zeros: float = 0.95, width: int = 512) -> nn.Sequential:
    from lightning_snip.enforcement import apply_masks_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            apply_masks_([layer.weight], [torch.rand_like(layer.weight) > zeros])  # +0.0, as the callback zeroes
    return model.eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_safetensors_files_round_trip_bit_for_bit_and_load_with_safetensors(tmp_path, dtype):
    import safetensors.torch

    from lightning_snip import load_compressed, save_compressed

    state = _pruned_mlp().to(dtype).state_dict()
    state_extra = {"model": state, "step": 7, "names": ("a", None), "nan": float("nan")}
    size = save_compressed(state_extra, tmp_path / "model.safetensors")
    assert size == (tmp_path / "model.safetensors").stat().st_size
    raw = safetensors.torch.load_file(tmp_path / "model.safetensors")  # an ordinary safetensors file
    assert "entries/model/items/0/values" in raw or any(name.endswith("/values") for name in raw)
    restored = load_compressed(tmp_path / "model.safetensors")
    assert restored["step"] == 7
    assert restored["names"] == ("a", None)
    assert restored["nan"] != restored["nan"]
    for key, value in state.items():
        assert restored["model"][key].dtype == value.dtype
        assert torch.equal(restored["model"][key], value), key
    dense = len(pickle.dumps(state))
    assert dense / size > 8


def test_a_damaged_or_foreign_safetensors_file_is_refused(tmp_path):
    import safetensors.torch

    from lightning_snip import CompressedStateError, load_compressed, save_compressed

    path = tmp_path / "model.safetensors"
    save_compressed(_pruned_mlp().state_dict(), path)
    data = bytearray(path.read_bytes())
    data[-50] ^= 0xFF  # one byte of the last stored tensor
    path.write_bytes(bytes(data))
    with pytest.raises(CompressedStateError, match=r"state_dict\['2\.weight'\] is damaged"):
        load_compressed(path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CompressedStateError, match=r"model\.safetensors could not be read"):
        load_compressed(path)
    safetensors.torch.save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CompressedStateError, match="not a compressed state dict"):
        load_compressed(tmp_path / "plain.safetensors")


@pytest.mark.parametrize(
    ("module", "call", "extra"),
    [
        (
            "safetensors",
            lambda p: __import__("lightning_snip").save_compressed({"w": torch.zeros(2)}, p / "a.safetensors"),
            "safetensors",
        ),
        (
            "onnx",
            lambda p: __import__("lightning_snip").export_onnx(nn.Linear(2, 2), torch.zeros(1, 2), p / "a.onnx"),
            "onnx",
        ),
    ],
    ids=["safetensors", "onnx"],
)
def test_missing_extras_are_named(tmp_path, monkeypatch, module, call, extra):
    real_import = builtins.__import__

    def missing(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named {module!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", missing)
    with pytest.raises(ImportError, match=rf'pip install "lightning-snip\[{extra}\]"'):
        call(tmp_path)


@pytest.mark.slow  # an ONNX export (a few seconds)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_onnx_export_stores_pruned_weights_sparse_and_runs_in_onnx_runtime(tmp_path, dtype):
    import onnx
    import onnxruntime

    from lightning_snip import export_onnx

    model = _pruned_mlp(width=1024).to(dtype)
    x = torch.randn(3, 1024, dtype=dtype)
    report = export_onnx(model, x, tmp_path / "model.onnx")
    assert set(report.sparse) == {"0.weight", "2.weight"}  # the dense last layer stays dense
    assert report.ratio > 5
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert {s.values.name for s in graph.sparse_initializer} == {"0.weight", "2.weight"}
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-4)
    assert report.max_difference < 1e-4
    assert model.training is False
    assert report.bytes == (tmp_path / "model.onnx").stat().st_size
