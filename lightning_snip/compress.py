"""Smaller files from the zeros: an exact, compact form of a pruned model's ``state_dict``.

Plain PyTorch, no Lightning. Each floating-point tensor is stored in the smallest exact form that suits it:

- ``"bitmask"``: a bit-packed map of its nonzero entries (row-major, 1 bit per entry) and the nonzero values;
- ``"csr"``: the tensor viewed as ``(shape[0], -1)`` in compressed sparse rows, with the narrowest index dtypes
  (``uint8``, ``int16``, ``int32`` or ``int64``) that hold its column count and its number of nonzeros;
- ``"dense"``: the tensor as it is, when neither form is smaller (or it is not floating point).

Zeros are not stored; where some are ``-0.0`` (as multiplying a negative weight by a zero mask leaves them), one bit
per zero records its sign. ``nan`` and ``inf`` are values like any other, and zeros and signs are read from the bits,
so decompression is bit-identical for every floating-point dtype (float8 included). Complex tensors, integer and
bool tensors are stored dense; quantized, sparse, meta and subclassed tensors are refused with a ``TypeError``
naming the key.

Nested ``dict``, ``OrderedDict``, ``list`` and ``tuple`` containers are stored the same way, so whole checkpoints and
optimizer states shrink too. Every tensor carries the CRC-32 of its bytes, and the whole dict a CRC-32 of its keys,
plain values, containers, dtypes and shapes, both checked on decompression: damage is an error that names the key,
never a wrong tensor or a value under another key. The compressed dict is a snapshot (it shares no memory with what
was compressed) and holds only tensors and plain Python values: ``torch.save`` it and read it back with
``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import copy
import json
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
#: 1: flat state dicts, a checksum per tensor; 2: nested containers, and a checksum over keys, values and structure.
VERSION = 2
_READ_VERSIONS = (1, 2)
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


def _sign_bit(dtype: torch.dtype) -> int:
    """The sign bit of an integer view of ``dtype``'s width (``uint8`` for one byte, else the signed type)."""
    return 0x80 if dtype == torch.uint8 else torch.iinfo(dtype).min


def _storable(t: Tensor, key: str) -> Tensor:
    """``t`` detached, on the CPU, with conjugate and negative views resolved; or a ``TypeError`` naming ``key``."""
    if t.layout != torch.strided:
        raise TypeError(f"`state_dict{key}` is a {t.layout} tensor; only strided tensors are stored.")
    if t.is_quantized:
        raise TypeError(
            f"`state_dict{key}` is a quantized tensor ({t.dtype}), which is not stored. Store its"
            " `int_repr()`, scale and zero point, or `dequantize()` it."
        )
    if t.is_meta:
        raise TypeError(f"`state_dict{key}` is a {t.dtype} tensor on the meta device: it holds no values to store.")
    if type(t) not in (Tensor, torch.nn.Parameter):
        raise TypeError(
            f"`state_dict{key}` is a {type(t).__name__} ({t.dtype}), not a plain tensor. Store its full local"
            " value (e.g. `full_tensor()` of a DTensor)."
        )
    return t.detach().cpu().resolve_conj().resolve_neg()


def _compress_tensor(t: Tensor) -> dict[str, Any]:
    """The smallest exact form of a (storable, CPU) tensor; it never shares memory with ``t``.

    Zeros and signs are read from the bits (an integer view of the same width), so every floating-point format is
    exact: ``-0.0``, ``nan`` payloads and the float8 formats whose ``0x80`` is ``nan`` included.
    """
    entry: dict[str, Any] = {"shape": list(t.shape), "crc32": _crc32(t)}
    if _is_compressible(t) and t.numel():
        bits = _bits(t).reshape(-1)
        sign = _sign_bit(bits.dtype)
        nonzero = (bits & ~sign) != 0  # any bit but the sign: every value that is not +-0
        negative_zeros = ~nonzero & (bits != 0)
        nnz = int(nonzero.sum())
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
        if form != "dense":
            values = bits[nonzero].view(t.dtype)  # boolean indexing copies
            if signs is not None:
                entry["zero_signs"] = signs  # one bit per zero: set where its sign bit is set
            if form == "bitmask":
                return {**entry, "form": "bitmask", "mask": pack_mask(nonzero), "values": values}
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
    # a copy of its own bytes: no aliasing of the caller's tensor, and a view does not save its whole storage
    return {**entry, "form": "dense", "tensor": t.clone(memory_format=torch.contiguous_format)}


_CONTAINERS = (dict, OrderedDict, list, tuple)
_KEY_TYPES = (str, int, float, bool, type(None))


def _where(parent: str, key: Any) -> str:
    """Where a value sits, as its subscripts: ``['optimizer_states'][0]['state']``."""
    return f"{parent}[{key!r}]"


def _pack(value: Any, where: str, signature: list[Any]) -> dict[str, Any]:
    """The entry of one value (a tensor, a plain value or a container of them); ``signature`` records its structure."""
    if isinstance(value, Tensor):
        packed = _compress_tensor(_storable(value, where))
        signature.append(("tensor", str(value.dtype), tuple(value.shape), packed["crc32"]))
        return packed
    if _is_plain(value):
        signature.append(("value", repr(value)))
        return {"form": "value", "value": copy.deepcopy(value)}
    if type(value) in (dict, OrderedDict):
        keys = list(value)
        for key in keys:
            if not isinstance(key, _KEY_TYPES):
                raise TypeError(
                    f"`state_dict{where}` has a key {key!r} of type {type(key).__name__}; keys of nested dicts must"
                    " be strings, numbers, booleans or None."
                )
        signature.append((type(value).__name__, repr(keys)))
        entry: dict[str, Any] = {
            "form": "dict",
            "ordered": type(value) is OrderedDict,
            "keys": keys,
            "items": [_pack(value[key], _where(where, key), signature) for key in keys],
        }
        metadata = _plain_metadata(value)
        if metadata is not None:
            entry["metadata"] = metadata
            signature.append(("metadata", repr(metadata)))
        return entry
    if type(value) in (list, tuple):
        signature.append((type(value).__name__, len(value)))
        return {
            "form": type(value).__name__,
            "items": [_pack(item, _where(where, index), signature) for index, item in enumerate(value)],
        }
    raise TypeError(
        f"`state_dict{where}` is a {type(value).__name__}, which `torch.load(..., weights_only=True)` cannot read"
        " back. Store tensors, plain values (numbers, strings, None) and dict, OrderedDict, list or tuple"
        " containers of them; convert others first (e.g. `dict(hparams)`, `vars(namespace)`)."
    )


def _plain_metadata(value: Any) -> dict[str, Any] | None:
    metadata = getattr(value, "_metadata", None)
    if isinstance(metadata, Mapping) and _is_plain(dict(metadata)):
        return {str(k): dict(v) for k, v in metadata.items()}  # module versions, as `load_state_dict` reads them
    return None


def _checksum(signature: list[Any]) -> int:
    """The CRC-32 of the structure: every key, container, plain value, dtype, shape and tensor checksum, in order."""
    return zlib.crc32(repr(signature).encode())


def compress_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Store a (pruned) ``state_dict`` compactly and exactly; :func:`decompress_state_dict` restores it bit for bit.

    Floating-point tensors that are mostly zeros are stored as a bit-packed nonzero map plus their values, or in
    compressed sparse rows, whichever is smaller; all other tensors as they are. Nested containers (``dict``,
    ``OrderedDict``, ``list``, ``tuple``) of tensors and plain values are stored the same way, so a whole Lightning
    checkpoint or an optimizer's state dict shrinks too. The result is a snapshot: it shares no memory with
    ``state_dict`` (training on does not change it, and what :func:`decompress_state_dict` returns does not write
    into the model). It holds only tensors (on the CPU) and plain Python values, so ``torch.load(path,
    weights_only=True)`` reads a saved one. A checksum covers every tensor's bytes, and another the keys, the plain
    values, the containers, dtypes and shapes.

    Args:
        state_dict: Tensors, plain values (``bool``, ``int``, ``float``, ``str``, ``None``) and ``dict``,
            ``OrderedDict``, ``list`` or ``tuple`` containers of them, by string key: ``model.state_dict()``, an
            optimizer's ``state_dict()`` or a loaded Lightning checkpoint.

    Returns:
        The compressed dict, for ``torch.save``.

    Raises:
        TypeError: If a value cannot be stored exactly (another class, a quantized, sparse, meta or subclassed
            tensor); the message names its key and type.

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
    signature: list[Any] = []
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"`state_dict` keys must be strings, got {key!r}.")
        signature.append(("key", key))
        entries[key] = _pack(value, _where("", key), signature)
    out: dict[str, Any] = {"format": FORMAT, "version": VERSION, "entries": entries}
    metadata = _plain_metadata(state_dict)
    if metadata is not None:
        out["metadata"] = metadata
        signature.append(("metadata", repr(metadata)))
    out["checksum"] = _checksum(signature)
    return out


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is a plain value, or a ``dict``/``OrderedDict``/``list``/``tuple`` of them (no tensors)."""
    if isinstance(value, _PLAIN):
        return type(value) in _PLAIN  # not a subclass (an IntEnum, say), which `weights_only` would not read
    if type(value) in (list, tuple):
        return all(_is_plain(v) for v in value)
    if type(value) in (dict, OrderedDict):
        return all(isinstance(k, _KEY_TYPES) and _is_plain(v) for k, v in value.items())
    return False


def _fail(key: str, why: str) -> CompressedStateError:
    return CompressedStateError(
        f"Compressed entry state_dict{key} is damaged: {why}. Write the file again from the model."
    )


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
        out = out.clone()  # the restored dict does not alias the compressed one
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
        bits = torch.zeros(total, dtype=_INT_OF_SIZE[values.element_size()])  # written bit for bit, as read
        bits[nonzero] = _bits(values)
        if "zero_signs" in entry:
            zeros = total - values.numel()
            packed_signs = _tensor_field(entry, key, "zero_signs", (torch.uint8,))
            if packed_signs.numel() != (zeros + 7) // 8:
                raise _fail(key, f"its zero signs have {packed_signs.numel()} bytes for {zeros} zeros")
            negative = torch.zeros(total, dtype=torch.bool)
            negative[~nonzero] = unpack_mask(packed_signs, (zeros,))
            bits[negative] = _sign_bit(bits.dtype)
        out = bits.view(values.dtype).reshape(shape)
    else:
        raise _fail(key, f"its form is {form!r}")
    if _crc32(out) != entry.get("crc32"):
        raise _fail(key, "its bytes do not match the checksum written with it")
    return out


def _unpack(entry: Any, where: str, signature: list[Any]) -> Any:
    """The value an entry of :func:`_pack` stands for, its structure recorded in ``signature`` as when packed."""
    if not isinstance(entry, Mapping):
        raise _fail(where, f"it is a {type(entry).__name__}, not a mapping")
    form = entry.get("form")
    if form == "value":
        value = copy.deepcopy(entry.get("value"))
        signature.append(("value", repr(value)))
        return value
    if form == "dict":
        keys, items = entry.get("keys"), entry.get("items")
        if not isinstance(keys, list) or not isinstance(items, list) or len(keys) != len(items):
            raise _fail(where, "its keys and items do not match")
        container: dict[Any, Any] = OrderedDict() if entry.get("ordered") else {}
        signature.append((type(container).__name__, repr(keys)))
        for key, item in zip(keys, items, strict=True):
            container[key] = _unpack(item, _where(where, key), signature)
        metadata = entry.get("metadata")
        if isinstance(metadata, Mapping):
            container._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
            signature.append(("metadata", repr(dict(metadata))))
        return container
    if form in ("list", "tuple"):
        items = entry.get("items")
        if not isinstance(items, list):
            raise _fail(where, "its items are not a list")
        signature.append((form, len(items)))
        restored = [_unpack(item, _where(where, index), signature) for index, item in enumerate(items)]
        return restored if form == "list" else tuple(restored)
    out = _decompress_tensor(where, entry)
    signature.append(("tensor", str(out.dtype), tuple(out.shape), entry.get("crc32")))
    return out


def decompress_state_dict(compressed: Mapping[str, Any]) -> dict[str, Any]:
    """Restore the ``state_dict`` that :func:`compress_state_dict` compressed, bit for bit.

    Same keys in the same order, same containers, dtypes, shapes and values (signed zeros, ``nan`` and ``inf``
    included), every tensor on the CPU; a model's state dict loads with ``strict=True`` into the never-pruned model.
    The result shares no memory with ``compressed``.

    Args:
        compressed: What :func:`compress_state_dict` returned (or ``torch.load`` of a saved one).

    Returns:
        The state dict, an ``OrderedDict`` carrying the original ``_metadata`` (module versions) when there was one.

    Raises:
        CompressedStateError: (a ``ValueError``) If ``compressed`` is not a compressed state dict, an entry is
            damaged (its message names the key), or its keys, plain values or structure do not match the checksum
            written with them: never a wrong tensor or a value under a wrong key.
    """
    if not isinstance(compressed, Mapping) or compressed.get("format") != FORMAT:
        raise CompressedStateError(
            "`compressed` is not a compressed state dict (no 'format' of "
            f"{FORMAT!r}); make one with `lightning_snip.compress_state_dict(model.state_dict())`."
        )
    version = compressed.get("version")
    if version not in _READ_VERSIONS:
        raise CompressedStateError(
            f"This compressed state dict has version {version!r}; this lightning-snip reads versions"
            f" {list(_READ_VERSIONS)}. Upgrade lightning-snip."
        )
    entries = compressed.get("entries")
    if not isinstance(entries, Mapping):
        raise CompressedStateError("The compressed state dict has no 'entries' mapping.")
    out: OrderedDict[str, Any] = OrderedDict()
    signature: list[Any] = []
    for key, entry in entries.items():
        signature.append(("key", key))
        out[key] = _unpack(entry, _where("", key), signature)
    metadata = compressed.get("metadata")
    if isinstance(metadata, Mapping):
        out._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
        signature.append(("metadata", repr(dict(metadata))))
    if version >= 2 and compressed.get("checksum") != _checksum(signature):
        raise CompressedStateError(
            "The compressed state dict's keys, plain values or structure do not match the checksum written with them"
            " (a damaged key name or value, say). Write the file again from the model."
        )
    return out


SAFETENSORS_EXTRA = 'pip install "lightning-snip[safetensors]"'


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError(
            f"Writing or reading a `.safetensors` file needs the safetensors package. Install the extra:"
            f" {SAFETENSORS_EXTRA}"
        ) from error
    return safetensors


def _encode(value: Any, where: str, tensors: dict[str, Tensor]) -> Any:
    """A JSON form of the compressed dict's structure; tensors go to ``tensors`` under their paths."""
    if isinstance(value, Tensor):
        tensors[where] = value.contiguous()
        return {"__tensor__": where}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if type(value) is tuple:
        return {"__tuple__": [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(value)]}
    if type(value) is list:
        return [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(value)]
    if type(value) in (dict, OrderedDict):
        items = [[_encode(k, where, tensors), _encode(v, f"{where}/{k}", tensors)] for k, v in value.items()]
        return {"__odict__" if type(value) is OrderedDict else "__dict__": items}
    raise TypeError(f"Cannot store a {type(value).__name__} at {where} in a safetensors file.")  # pragma: no cover


def _decode(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__float__" in value:
        return float(value["__float__"])
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    kind = OrderedDict if "__odict__" in value else dict
    items: list[Any] = value["__odict__"] if "__odict__" in value else value.get("__dict__", [])
    return kind((_decode(k, tensors), _decode(v, tensors)) for k, v in items)


def save_compressed(state_dict: Mapping[str, Any], path: str | Path) -> int:
    """:func:`compress_state_dict` and write it to ``path``; returns the file size in bytes.

    A path ending in ``.safetensors`` gets a safetensors file (the extra ``lightning-snip[safetensors]``): the
    compressed tensors under readable names (``entries/<key>/values`` ...) and the structure as string metadata, so
    ``safetensors.torch.load_file`` reads it and :func:`load_compressed` restores the state dict, with the same
    checksums. Any other path gets a ``torch.save`` file (read with ``torch.load(path, weights_only=True)``).

    Raises:
        ImportError: For ``.safetensors`` without the safetensors package (the message names the extra).
    """
    path = Path(path)
    compressed = compress_state_dict(state_dict)
    if path.suffix == ".safetensors":
        safetensors = _safetensors()
        tensors: dict[str, Tensor] = {}
        structure = json.dumps(_encode(compressed, "", tensors), allow_nan=False)
        metadata = {"format": FORMAT, "version": str(VERSION), "structure": structure}
        safetensors.torch.save_file({name.lstrip("/"): t for name, t in tensors.items()}, str(path), metadata)
    else:
        torch.save(compressed, path)
    return path.stat().st_size


def _read_safetensors(path: Path) -> Any:
    safetensors = _safetensors()
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {"/" + name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    if metadata.get("format") != FORMAT or "structure" not in metadata:
        raise CompressedStateError(
            f"{path} is a safetensors file but not a compressed state dict (no {FORMAT!r} metadata); write it with"
            " `lightning_snip.save_compressed(state_dict, 'name.safetensors')`."
        )
    return _decode(json.loads(metadata["structure"]), tensors)


def load_compressed(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`save_compressed` and :func:`decompress_state_dict` it.

    A ``.safetensors`` path is read with safetensors (the extra ``lightning-snip[safetensors]``); any other with
    ``torch.load(path, weights_only=True)``.

    Raises:
        CompressedStateError: If the file is truncated, damaged or not a compressed state dict (the message names the
            file, or the key of a damaged entry).
        FileNotFoundError: If there is no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No compressed state dict at {path}.")
    try:
        if path.suffix == ".safetensors":
            compressed = _read_safetensors(path)
        else:
            compressed = torch.load(path, map_location="cpu", weights_only=True)
    except (CompressedStateError, ImportError):
        raise
    except Exception as error:  # a truncated zip, a bad pickle: never half a state dict
        raise CompressedStateError(
            f"{path} could not be read as a compressed state dict; it is truncated, damaged or another kind of file"
            f" ({type(error).__name__}: {error})."
        ) from error
    return decompress_state_dict(compressed)
