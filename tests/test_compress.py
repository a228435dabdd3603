"""Compressed state dicts: exact, small, refused when damaged; and the callback's `save_compressed`."""

import csv
import io
import math
from collections import OrderedDict

import pytest
import torch
from helpers import BoringClassifier, fit
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_snip import (
    CompressedStateError,
    SNIPPruning,
    compress_state_dict,
    decompress_state_dict,
    load_compressed,
    save_compressed,
    select_masks,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool or t.element_size() == 1:
        return t.view(torch.uint8)
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_identical(restored: dict, original: dict) -> None:
    assert list(restored) == list(original)
    for key, value in original.items():
        if not isinstance(value, torch.Tensor):
            assert restored[key] == value, key
            continue
        got = restored[key]
        assert got.dtype == value.dtype, key
        assert got.shape == value.shape, key
        assert torch.equal(_bits(got.contiguous()), _bits(value.contiguous())), f"{key} differs bit for bit"


def _sparse(shape, zeros: float, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    t[torch.rand(shape, generator=g) < zeros] = 0
    return t


def _odd_values_state() -> dict:
    w = _sparse((64, 64), 0.97)
    w[0, :6] = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -3.0])
    half = _sparse((32, 128), 0.99, torch.float16)
    half[1, 1] = -0.0
    return {
        "w": w,
        "half": half,
        "bf16": _sparse((16, 3, 3, 3), 0.9, torch.bfloat16),
        "f64": _sparse((5, 200), 0.95, torch.float64),
        "bias": torch.randn(64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "all_zero": torch.zeros(300, 300),
        "dense": torch.randn(8, 8),
        "count": torch.tensor(7, dtype=torch.int64),
        "flags": torch.rand(4, 4) > 0.5,
        "int_sparse": torch.zeros(100, 100, dtype=torch.int32),
        "step": 12,
        "name": "lenet",
        "nothing": None,
        "sizes": [1, 2, {"a": 3.5}],
    }


def test_round_trip_is_bit_identical_through_a_file_read_with_weights_only(tmp_path):
    state = _odd_values_state()
    compressed = compress_state_dict(state)
    forms = {key: entry["form"] for key, entry in compressed["entries"].items()}
    assert forms["w"] == "csr"
    assert forms["all_zero"] == "csr"
    assert forms["half"] == "csr"
    assert forms["dense"] == forms["bias"] == forms["scalar"] == forms["count"] == forms["flags"] == "dense"
    assert forms["int_sparse"] == "dense"  # only floating-point tensors are compressed
    assert forms["step"] == "value"
    torch.save(compressed, tmp_path / "c.pt")
    _assert_identical(decompress_state_dict(torch.load(tmp_path / "c.pt", weights_only=True)), state)
    assert save_compressed(state, tmp_path / "d.pt") == (tmp_path / "d.pt").stat().st_size
    _assert_identical(load_compressed(tmp_path / "d.pt"), state)


def test_zeros_left_by_multiplying_with_a_mask_keep_their_signs_and_still_compress():
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    keep = torch.rand(512, 512, generator=torch.Generator().manual_seed(1)) < 0.05
    pruned = w * keep  # -0.0 wherever a negative weight was pruned
    assert int(pruned.signbit().logical_and(pruned == 0).sum()) > 100_000
    compressed = compress_state_dict({"w": pruned})
    entry = compressed["entries"]["w"]
    assert entry["form"] == "csr"
    assert entry["zero_signs"].numel() == (int((pruned == 0).sum()) + 7) // 8
    assert _file_bytes({"w": pruned}) / _file_bytes(compressed) > 8  # a bit per zero, still far smaller than dense
    _assert_identical(decompress_state_dict(compressed), {"w": pruned})
    assert "zero_signs" not in compress_state_dict({"w": pruned.abs()})["entries"]["w"]  # +0.0 only: no sign map


def test_the_smallest_form_and_the_narrowest_index_dtypes_are_chosen():
    entries = compress_state_dict(
        {
            "moderate": _sparse((64, 64), 0.8),  # bitmask: 512 + 4 bytes per value beats CSR's 5 per value
            "narrow": _sparse((300, 200), 0.99),  # 200 columns: uint8 column indices; 600 nonzeros: int16 pointers
            "wide": _sparse((4, 40000), 0.5, torch.float64),  # 40000 columns: int32 column indices
            "barely": _sparse((64, 64), 0.02),  # too few zeros to pay for a map
        }
    )["entries"]
    assert entries["moderate"]["form"] == "bitmask"
    assert entries["moderate"]["mask"].numel() == 64 * 64 // 8
    assert entries["narrow"]["form"] == "csr"
    assert entries["narrow"]["col_indices"].dtype == torch.uint8
    assert entries["narrow"]["crow_indices"].dtype == torch.int16
    assert entries["wide"]["form"] in ("bitmask", "csr")
    if entries["wide"]["form"] == "csr":
        assert entries["wide"]["col_indices"].dtype == torch.int32
    assert entries["barely"]["form"] == "dense"


def test_a_pruned_lightning_model_loads_strictly_into_the_never_pruned_model(tmp_path):
    torch.manual_seed(0)
    model = BoringClassifier(dropout=0.0)
    fit(model, [SNIPPruning(sparsity=0.9, plot=False)], max_steps=3)
    save_compressed(model.state_dict(), tmp_path / "pruned.pt")
    fresh = BoringClassifier(dropout=0.0)
    fresh.load_state_dict(load_compressed(tmp_path / "pruned.pt"), strict=True)
    _assert_identical(fresh.state_dict(), model.state_dict())
    model.eval(), fresh.eval()
    x = torch.randn(8, 16)
    assert torch.equal(fresh(x), model(x))


def test_module_versions_travel_with_the_state_dict():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    restored = decompress_state_dict(compress_state_dict(net.state_dict()))
    assert isinstance(restored, OrderedDict)
    assert restored._metadata["1"]["version"] == net.state_dict()._metadata["1"]["version"]


def _file_bytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


@pytest.mark.slow
def test_the_4096_mlp_file_is_10x_smaller_at_95_percent_and_30x_at_99():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000))
    dense = _file_bytes(mlp.state_dict())
    weights = {name: p for name, p in mlp.named_parameters() if p.dim() == 2}
    ratios = {}
    for sparsity in (0.95, 0.99):
        state = {k: v.clone() for k, v in mlp.state_dict().items()}
        kept = select_masks({name: w.detach().abs() for name, w in weights.items()}, sparsity)  # exact global count
        for name, mask in kept.items():
            state[name][~mask] = 0
        ratios[sparsity] = dense / _file_bytes(compress_state_dict(state))
    assert ratios[0.95] >= 10, ratios
    assert ratios[0.99] >= 30, ratios


def _damage(entry_key: str, change) -> dict:
    signed = _sparse((64, 64), 0.0) * (torch.rand(64, 64, generator=torch.Generator().manual_seed(2)) < 0.1)
    compressed = compress_state_dict(
        {"ok": torch.randn(3), "w": _sparse((64, 64), 0.97), "m": _sparse((64, 64), 0.8), "s": signed}
    )
    change(compressed["entries"][entry_key])
    return compressed


def _flip_value(entry: dict) -> None:
    entry["values"][0] = entry["values"][0] + 1


def _shift_column(entry: dict) -> None:
    entry["col_indices"][0] = 200


def _swap_columns(entry: dict) -> None:
    # two columns of the first nonempty row, swapped: the positions are no longer in increasing order
    first = int(entry["crow_indices"].to(torch.int64).diff().gt(1).nonzero()[0])
    start = int(entry["crow_indices"][first])
    pair = entry["col_indices"][start : start + 2].clone()
    entry["col_indices"][start : start + 2] = pair.flip(0)


DAMAGE = {
    "value-flipped": ("w", _flip_value, r"'w'.*checksum"),
    "value-dropped": ("w", lambda e: e.update(values=e["values"][:-1]), r"'w'.*row pointers|'w'.*values"),
    "column-out-of-range": ("w", _shift_column, r"'w'.*out of range|'w'.*increasing|'w'.*checksum"),
    "columns-swapped": ("w", _swap_columns, r"'w'.*strictly increasing"),
    "pointer-count": ("w", lambda e: e.update(crow_indices=e["crow_indices"][:-1]), r"'w'.*row pointers"),
    "mask-truncated": ("m", lambda e: e.update(mask=e["mask"][:-1]), r"'m'.*mask has 511 bytes"),
    "mask-bit-flipped": ("m", lambda e: e["mask"].__setitem__(0, e["mask"][0] ^ 1), r"'m'"),
    "shape": ("w", lambda e: e.update(shape=[64, -1]), r"'w'.*shape"),
    "zero-signs-truncated": ("s", lambda e: e.update(zero_signs=e["zero_signs"][:-1]), r"'s'.*zero signs have"),
    "zero-sign-flipped": ("s", lambda e: e["zero_signs"].__setitem__(3, e["zero_signs"][3] ^ 8), r"'s'.*checksum"),
    "form": ("ok", lambda e: e.update(form="zip"), r"'ok'.*form"),
    "dense-tensor": ("ok", lambda e: e.update(tensor=torch.randn(4)), r"'ok'.*shape"),
    "values-not-a-tensor": ("w", lambda e: e.update(values=[1.0]), r"'w'.*'values' is list"),
    "index-dtype": ("w", lambda e: e.update(col_indices=e["col_indices"].float()), r"'w'.*'col_indices' has dtype"),
}


@pytest.mark.parametrize(("key", "change", "message"), DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_entry_is_an_error_naming_its_key_never_a_wrong_tensor(key, change, message):
    with pytest.raises(CompressedStateError, match=message):
        decompress_state_dict(_damage(key, change))


def test_not_a_compressed_state_dict_or_another_version_is_refused():
    with pytest.raises(CompressedStateError, match="not a compressed state dict"):
        decompress_state_dict({"w": torch.zeros(3)})
    newer = compress_state_dict({"w": torch.zeros(3)})
    newer["version"] = 99
    with pytest.raises(CompressedStateError, match="version 99"):
        decompress_state_dict(newer)


def test_a_truncated_file_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "weights.pt"
    save_compressed({"w": _sparse((256, 256), 0.95)}, path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        path.write_bytes(data[:cut])
        with pytest.raises(CompressedStateError, match=r"weights\.pt could not be read .*truncated"):
            load_compressed(path)
    with pytest.raises(FileNotFoundError, match="No compressed state dict"):
        load_compressed(tmp_path / "missing.pt")


def test_what_weights_only_cannot_read_back_is_refused_naming_the_key():
    with pytest.raises(TypeError, match=r"state_dict\['extra'\]` is a object"):
        compress_state_dict({"w": torch.zeros(2), "extra": object()})
    with pytest.raises(TypeError, match=r"state_dict\['s'\]` is a torch.sparse_coo tensor"):
        compress_state_dict({"s": torch.zeros(2, 2).to_sparse()})
    with pytest.raises(TypeError, match="mapping"):
        compress_state_dict([torch.zeros(2)])


def test_the_callback_writes_the_compressed_trained_weights_next_to_the_logs(tmp_path):
    torch.manual_seed(0)
    model = BoringClassifier(dropout=0.0)
    logger = CSVLogger(tmp_path, name="logs", version=0)
    pruning = SNIPPruning(sparsity=0.9, plot=False, save_compressed=True)
    fit(model, [pruning], max_steps=4, logger=logger, log_every_n_steps=1)
    path = tmp_path / "logs" / "version_0" / "snip_compressed.pt"
    restored = load_compressed(path)
    _assert_identical(restored, model.state_dict())  # the trained weights, zeros included
    for name, mask in pruning.masks.items():
        assert not restored[name][~mask].any()
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("snip/compressed_bytes")]
    assert len(rows) == 1
    assert int(float(rows[0]["snip/compressed_bytes"])) == path.stat().st_size
    dense = sum(v.nbytes for v in model.state_dict().values())
    assert math.isclose(float(rows[0]["snip/compression_ratio"]), dense / path.stat().st_size, rel_tol=1e-6)


def test_save_compressed_is_off_by_default_and_checked(tmp_path):
    model = BoringClassifier(dropout=0.0)
    fit(model, [SNIPPruning(sparsity=0.9, plot=False)], max_steps=1, default_root_dir=str(tmp_path))
    assert not list(tmp_path.rglob("snip_compressed.pt"))
    with pytest.raises(TypeError, match=r"`save_compressed` must be True or False, got 'yes'"):
        SNIPPruning(save_compressed="yes")
