"""Where each tensor's bytes lie in a safetensors file, read and written with bounds.

A safetensors file is an 8-byte little-endian header length, a JSON header
(``name -> {dtype, shape, data_offsets}``) and the tensors' bytes. Model
distribution reads tensors by byte range at the source and writes them into a
new file at the receiver, so both sides trust a header only after checking it:
its length, the number of tensors, each tensor's size against its dtype and
shape, and every range against the file's size — before allocating anything.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pomona.model_profile import read_safetensors_header

MAX_HEADER_BYTES = 100 << 20
MAX_TENSORS = 1_000_000
# No single tensor of any released model comes near this; a header that claims
# more is broken or hostile.
MAX_TENSOR_BYTES = 1 << 40
MAX_NAME_CHARS = 1024
ALIGN = 8

DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


class LayoutError(ValueError):
    """A safetensors header or tensor description that cannot be trusted."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as described by a header: no position."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class TensorLocation:
    """A tensor's bytes inside one file: ``[start, start + nbytes)``, absolute."""

    info: TensorInfo
    path: Path
    start: int

    @property
    def end(self) -> int:
        return self.start + self.info.nbytes


def check_tensor(name: str, dtype: str, shape: Iterable[int], nbytes: int) -> TensorInfo:
    """A TensorInfo, or LayoutError when its description is inconsistent or absurd."""
    if not name or len(name) > MAX_NAME_CHARS or any(ord(c) < 32 for c in name):
        raise LayoutError(f"tensor name {name[:60]!r} is empty, too long or holds control chars")
    if dtype not in DTYPE_BYTES:
        raise LayoutError(f"tensor {name!r} has unknown dtype {dtype!r}")
    dims = tuple(int(d) for d in shape)
    if len(dims) > 8 or any(d < 0 for d in dims):
        raise LayoutError(f"tensor {name!r} has an invalid shape {dims}")
    expected = math.prod(dims) * DTYPE_BYTES[dtype]
    if expected != nbytes:
        raise LayoutError(
            f"tensor {name!r}: {nbytes} bytes do not match its shape {dims} of {dtype}"
        )
    if nbytes > MAX_TENSOR_BYTES:
        raise LayoutError(
            f"tensor {name!r} claims {nbytes} bytes, over the limit of {MAX_TENSOR_BYTES}"
        )
    return TensorInfo(name, dtype, dims, nbytes)


def read_layout(path: Path) -> dict[str, TensorLocation]:
    """Every tensor of the safetensors file at ``path`` with its absolute byte range."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise LayoutError(f"{path.name} is not a safetensors file (under 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise LayoutError(
                f"{path.name} claims a header of {length} bytes in a file of {size} bytes"
            )
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LayoutError(f"{path.name} has an unreadable safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise LayoutError(f"{path.name}'s header is not a JSON object")
    if len(header) > MAX_TENSORS + 1:
        raise LayoutError(f"{path.name}'s header lists {len(header)} tensors")
    base = 8 + length
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            info = check_tensor(name, str(entry["dtype"]), entry["shape"], end - begin)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, LayoutError):
                raise LayoutError(f"{path.name}: {e}") from None
            raise LayoutError(f"{path.name}: tensor {name!r} has a malformed entry") from e
        if begin < 0 or base + end > size:
            raise LayoutError(
                f"{path.name}: tensor {name!r} lies at [{begin}, {end}), "
                f"past the file's {size - base} data bytes"
            )
        out[name] = TensorLocation(info, path, base + begin)
    return out


def header_for(tensors: Iterable[TensorInfo]) -> tuple[bytes, dict[str, int]]:
    """The header of a new file holding ``tensors`` in order, and each one's data offset.

    Offsets are relative to the end of the header (as in the file's own
    ``data_offsets``); the header is padded with spaces to 8 bytes.
    """
    entries: dict[str, object] = {"__metadata__": {"format": "mlx"}}
    offsets = {}
    at = 0
    for t in tensors:
        entries[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [at, at + t.nbytes],
        }
        offsets[t.name] = at
        at += t.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % ALIGN)
    return struct.pack("<Q", len(text)) + text, offsets


@dataclass(frozen=True)
class ChunkSpan:
    """``length`` bytes at ``offset`` inside tensor ``tensor``'s data."""

    tensor: str
    offset: int
    length: int

    @property
    def key(self) -> str:
        return f"{self.tensor}@{self.offset}"


def chunk_spans(tensors: Iterable[TensorInfo], chunk_bytes: int) -> Iterator[ChunkSpan]:
    """Fixed-size chunks of every tensor's data (the last of each tensor shorter)."""
    if chunk_bytes <= 0:
        raise ValueError("chunk size must be positive")
    for t in tensors:
        if t.nbytes == 0:
            yield ChunkSpan(t.name, 0, 0)
        for offset in range(0, t.nbytes, chunk_bytes):
            yield ChunkSpan(t.name, offset, min(chunk_bytes, t.nbytes - offset))


def weight_index(files: Mapping[str, Iterable[str]], total_bytes: int) -> str:
    """A ``model.safetensors.index.json`` for ``file name -> tensor names``."""
    wmap = {name: file for file, names in files.items() for name in names}
    return json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": wmap}, indent=1)


_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    match = _LAYER_KEY.search(tensor_name)
    return int(match.group(1)) if match else None


def weight_map(model_path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the index or the single file."""
    index = model_path / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(model_path.glob("model*.safetensors"))
    if len(files) == 1:
        return {name: files[0].name for name in read_safetensors_header(files[0])}
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {model_path}")
    raise FileNotFoundError(
        f"{model_path} has {len(files)} safetensors files but no model.safetensors.index.json"
    )
