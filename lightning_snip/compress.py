"""Smaller files from the zeros: an exact, compact form of a pruned model's ``state_dict``.

Plain PyTorch, no Lightning. Each floating-point tensor is stored in the smallest exact form that suits it:

- ``"bitmask"``: a bit-packed map of its nonzero entries (row-major, 1 bit per entry) and the nonzero values;
- ``"csr"``: the tensor viewed as ``(shape[0], -1)`` in compressed sparse rows, with the narrowest index dtypes
  (``uint8``, ``int16``, ``int32`` or ``int64``) that hold its column count and its number of nonzeros;
- ``"dense"``: the tensor as it is, when neither form is smaller (or it is not floating point).

Zeros are not stored; where some are ``-0.0`` (as multiplying a negative weight by a zero mask leaves them), one bit
per zero records its sign. ``nan`` and ``inf`` are values like any other, so decompression is bit-identical.
Every entry carries the CRC-32 of its tensor's bytes, checked after decompression, so a damaged entry is an error
that names its key, never a wrong tensor. The compressed dict holds only tensors and plain Python values:
``torch.save`` it and read it back with ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from lightning_snip.packing import pack_mask, unpack_mask

FORMAT = "lightning_snip.compressed_state_dict"
VERSION = 1
_RECORD_BYTES = 128  # what one more stored tensor costs in a `torch.save` file (zip header, alignment), roughly
_INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CRC_CHUNK = 1 << 26
_PLAIN = (bool, int, float, str, type(None))


class CompressedStateError(ValueError):
    """A compressed state dict (or file) that is damaged, truncated or not one at all."""


def _bits(t: Tensor) -> Tensor:
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()])


def _crc32(t: Tensor) -> int:
    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    crc = 0
    for start in range(0, flat.numel(), _CRC_CHUNK):  # no full copy of a large tensor
        crc = zlib.crc32(cast(Any, flat[start : start + _CRC_CHUNK].numpy()), crc)
    return crc


def _index_dtype(largest: int) -> torch.dtype:
    """The narrowest index dtype that holds ``largest`` (uint8 for small values, then the signed ones)."""
    for dtype in _INDEX_DTYPES:
        limit = 255 if dtype == torch.uint8 else torch.iinfo(dtype).max
        if largest <= limit:
            return dtype
    raise ValueError(f"{largest} does not fit an int64 index.")  # pragma: no cover - more than 2**63 entries


def _as_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0] if len(shape) > 1 else 1
    return rows, math.prod(shape) // rows if rows else 0


def _is_compressible(t: Tensor) -> bool:
    return t.is_floating_point() and t.layout == torch.strided and t.dim() >= 1 and t.element_size() in _INT_OF_SIZE


def _compress_tensor(t: Tensor) -> dict[str, Any]:
    t = t.detach().cpu()
    entry: dict[str, Any] = {"shape": list(t.shape), "crc32": _crc32(t)}
    if _is_compressible(t) and t.numel():
        flat = t.reshape(-1)
        nonzero = flat != 0  # `nan` is not zero; -0.0 is, and its sign is kept apart
        nnz = int(nonzero.sum())
        negative_zeros = ~nonzero & flat.signbit()
        signs = pack_mask(negative_zeros[~nonzero]) if bool(negative_zeros.any()) else None
        size = t.element_size()
        rows, cols = _as_rows(tuple(t.shape))
        crow_dtype, col_dtype = _index_dtype(nnz), _index_dtype(max(cols - 1, 0))
        extra = 0 if signs is None else signs.numel() + _RECORD_BYTES
        costs = {
            "dense": t.numel() * size,
            "bitmask": (t.numel() + 7) // 8 + nnz * size + _RECORD_BYTES + extra,
            "csr": (rows + 1) * crow_dtype.itemsize + nnz * (col_dtype.itemsize + size) + 2 * _RECORD_BYTES + extra,
        }
        form = min(costs, key=lambda k: costs[k])  # ties keep the earlier, simpler form
        if signs is not None:
            entry["zero_signs"] = signs  # one bit per zero: set where it is -0.0
        values = flat[nonzero].clone() if form != "dense" else flat
        if form == "bitmask":
            return {**entry, "form": "bitmask", "mask": pack_mask(nonzero), "values": values}
        if form == "csr":
            grid = nonzero.view(rows, cols)
            crow = torch.zeros(rows + 1, dtype=torch.int64)
            torch.cumsum(grid.sum(dim=1), dim=0, out=crow[1:])
            cols_of = grid.nonzero()[:, 1]
            return {
                **entry,
                "form": "csr",
                "crow_indices": crow.to(crow_dtype),
                "col_indices": cols_of.to(col_dtype),
                "values": values,
            }
        entry.pop("zero_signs", None)
    if t.layout == torch.strided and t.untyped_storage().nbytes() != t.nbytes:
        t = t.clone()  # a view saves its whole storage: keep only its own bytes
    return {**entry, "form": "dense", "tensor": t}


def compress_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Store a (pruned) ``state_dict`` compactly and exactly; :func:`decompress_state_dict` restores it bit for bit.

    Floating-point tensors that are mostly zeros are stored as a bit-packed nonzero map plus their values, or in
    compressed sparse rows, whichever is smaller; all other tensors as they are. The result holds only tensors (on
    the CPU) and plain Python values, so ``torch.load(path, weights_only=True)`` reads a saved one.

    Args:
        state_dict: Tensors and plain values (``bool``, ``int``, ``float``, ``str``, ``None``, lists and dicts of
            them) by key, such as ``model.state_dict()``.

    Returns:
        The compressed dict, for ``torch.save``.

    Raises:
        TypeError: If a value is neither a tensor nor a plain value (it would not load with ``weights_only=True``).

    Example::

        >>> w = torch.zeros(64, 64)
        >>> w[0, :3] = torch.tensor([1.0, -0.0, 2.0])
        >>> packed = compress_state_dict({"w": w, "step": 3})
        >>> packed["entries"]["w"]["form"], packed["entries"]["w"]["values"]
        ('csr', tensor([1., 2.]))
        >>> restored = decompress_state_dict(packed)
        >>> torch.equal(restored["w"], w) and torch.equal(restored["w"].signbit(), w.signbit()), restored["step"]
        (True, 3)
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"`state_dict` must be a mapping of names to tensors, got {type(state_dict).__name__}.")
    entries: dict[str, Any] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"`state_dict` keys must be strings, got {key!r}.")
        if isinstance(value, Tensor):
            if value.layout != torch.strided:
                raise TypeError(f"`state_dict[{key!r}]` is a {value.layout} tensor; only strided tensors are stored.")
            entries[key] = _compress_tensor(value)
        elif _is_plain(value):
            entries[key] = {"form": "value", "value": value}
        else:
            raise TypeError(
                f"`state_dict[{key!r}]` is a {type(value).__name__}, which `torch.load(..., weights_only=True)` cannot"
                " read back. Store only tensors and plain values (numbers, strings, lists and dicts of them)."
            )
    metadata = getattr(state_dict, "_metadata", None)
    out: dict[str, Any] = {"format": FORMAT, "version": VERSION, "entries": entries}
    if isinstance(metadata, Mapping) and _is_plain(dict(metadata)):
        out["metadata"] = {str(k): dict(v) for k, v in metadata.items()}  # module versions, as `load_state_dict` reads
    return out


def _is_plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, (str, int)) and _is_plain(v) for k, v in value.items())
    return False


def _fail(key: str, why: str) -> CompressedStateError:
    return CompressedStateError(f"Compressed entry {key!r} is damaged: {why}. Write the file again from the model.")


def _tensor_field(entry: Mapping[str, Any], key: str, field: str, dtypes: tuple[torch.dtype, ...] | None) -> Tensor:
    value = entry.get(field)
    if not isinstance(value, Tensor) or value.layout != torch.strided:
        raise _fail(key, f"its {field!r} is {type(value).__name__}, not a tensor")
    if dtypes is not None and value.dtype not in dtypes:
        raise _fail(key, f"its {field!r} has dtype {value.dtype}, expected one of {list(dtypes)}")
    if field != "tensor" and value.dim() != 1:
        raise _fail(key, f"its {field!r} has {value.dim()} dimensions, expected 1")
    return value


def _decompress_tensor(key: str, entry: Mapping[str, Any]) -> Tensor:
    shape = entry.get("shape")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise _fail(key, f"its shape is {shape!r}")
    shape = tuple(shape)
    form = entry.get("form")
    if form == "dense":
        out = _tensor_field(entry, key, "tensor", None)
        if tuple(out.shape) != shape:
            raise _fail(key, f"it holds shape {tuple(out.shape)} for {shape}")
    elif form in ("bitmask", "csr"):
        values = _tensor_field(entry, key, "values", None)
        if not _is_compressible(values) or not shape:
            raise _fail(key, f"its values have dtype {values.dtype} and its shape is {shape}")
        total = math.prod(shape)
        if form == "bitmask":
            packed = _tensor_field(entry, key, "mask", (torch.uint8,))
            if packed.numel() != (total + 7) // 8:
                raise _fail(key, f"its mask has {packed.numel()} bytes for {total} entries")
            nonzero = unpack_mask(packed, (total,))
        else:
            rows, cols = _as_rows(shape)
            crow = _tensor_field(entry, key, "crow_indices", _INDEX_DTYPES).to(torch.int64)
            col = _tensor_field(entry, key, "col_indices", _INDEX_DTYPES).to(torch.int64)
            if crow.numel() != rows + 1 or int(crow[0]) != 0 or int(crow[-1]) != col.numel():
                raise _fail(key, "its row pointers do not match its rows and column indices")
            counts = crow.diff()
            if bool((counts < 0).any()) or (col.numel() and (int(col.min()) < 0 or int(col.max()) >= cols)):
                raise _fail(key, "its row pointers decrease or a column index is out of range")
            row_of = torch.repeat_interleave(torch.arange(rows), counts)
            flat_index = row_of * cols + col
            if flat_index.numel() > 1 and not bool((flat_index.diff() > 0).all()):
                raise _fail(key, "its column indices are not strictly increasing within a row")
            nonzero = torch.zeros(total, dtype=torch.bool)
            nonzero[flat_index] = True
        if int(nonzero.sum()) != values.numel():
            raise _fail(key, f"it has {values.numel()} values for {int(nonzero.sum())} nonzero positions")
        out = torch.zeros(total, dtype=values.dtype)
        out[nonzero] = values
        if "zero_signs" in entry:
            zeros = total - values.numel()
            packed_signs = _tensor_field(entry, key, "zero_signs", (torch.uint8,))
            if packed_signs.numel() != (zeros + 7) // 8:
                raise _fail(key, f"its zero signs have {packed_signs.numel()} bytes for {zeros} zeros")
            negative = torch.zeros(total, dtype=torch.bool)
            negative[~nonzero] = unpack_mask(packed_signs, (zeros,))
            out[negative] = -0.0
        out = out.reshape(shape)
    else:
        raise _fail(key, f"its form is {form!r}")
    if _crc32(out) != entry.get("crc32"):
        raise _fail(key, "its bytes do not match the checksum written with it")
    return out


def decompress_state_dict(compressed: Mapping[str, Any]) -> dict[str, Any]:
    """Restore the ``state_dict`` that :func:`compress_state_dict` compressed, bit for bit.

    Same keys in the same order, same dtypes, shapes and values (signed zeros, ``nan`` and ``inf`` included), every
    tensor on the CPU; it loads with ``strict=True`` into the never-pruned model.

    Args:
        compressed: What :func:`compress_state_dict` returned (or ``torch.load`` of a saved one).

    Returns:
        The state dict, an ``OrderedDict`` carrying the original ``_metadata`` (module versions) when there was one.

    Raises:
        CompressedStateError: (a ``ValueError``) If ``compressed`` is not a compressed state dict, or an entry is
            damaged (its message names the key): never a wrong tensor.
    """
    if not isinstance(compressed, Mapping) or compressed.get("format") != FORMAT:
        raise CompressedStateError(
            "`compressed` is not a compressed state dict (no 'format' of "
            f"{FORMAT!r}); make one with `lightning_snip.compress_state_dict(model.state_dict())`."
        )
    if compressed.get("version") != VERSION:
        raise CompressedStateError(
            f"This compressed state dict has version {compressed.get('version')!r}; this lightning-snip reads version"
            f" {VERSION}. Upgrade lightning-snip."
        )
    entries = compressed.get("entries")
    if not isinstance(entries, Mapping):
        raise CompressedStateError("The compressed state dict has no 'entries' mapping.")
    out: OrderedDict[str, Any] = OrderedDict()
    for key, entry in entries.items():
        if not isinstance(entry, Mapping):
            raise _fail(str(key), f"it is a {type(entry).__name__}, not a mapping")
        out[key] = entry.get("value") if entry.get("form") == "value" else _decompress_tensor(str(key), entry)
    metadata = compressed.get("metadata")
    if isinstance(metadata, Mapping):
        out._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return out


def save_compressed(state_dict: Mapping[str, Any], path: str | Path) -> int:
    """:func:`compress_state_dict` and ``torch.save`` to ``path``; returns the file size in bytes."""
    path = Path(path)
    torch.save(compress_state_dict(state_dict), path)
    return path.stat().st_size


def load_compressed(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`save_compressed` (``weights_only=True``) and :func:`decompress_state_dict` it.

    Raises:
        CompressedStateError: If the file is truncated, damaged or not a compressed state dict (the message names the
            file, or the key of a damaged entry).
        FileNotFoundError: If there is no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No compressed state dict at {path}.")
    try:
        compressed = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip, a bad pickle: never half a state dict
        raise CompressedStateError(
            f"{path} could not be read as a compressed state dict; it is truncated, damaged or another kind of file"
            f" ({type(error).__name__}: {error})."
        ) from error
    return decompress_state_dict(compressed)
