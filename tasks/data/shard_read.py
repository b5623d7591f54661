"""Reading shards back fast: a tar reader for the members our writer makes, and ``.npy`` payloads.

The loader reads every sample of every epoch, so per-member cost matters: Python's ``tarfile``
spends ~0.1 ms on a member (builds before text-builder 3 had a PAX header per member), more
than the training step can hide at tiny sizes. This reader parses the 512-byte headers directly,
checks their checksums, applies PAX ``path`` / ``size`` records and refuses everything that is not
a plain file (links, devices, GNU long names) or whose name has path components, as before. A
``.npy`` header is parsed once per distinct header (the shapes of a build repeat).
"""

from __future__ import annotations

import ast
import tarfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np

BLOCK = 512
_FILE_TYPES = (b"0", b"\0")
_PAX_TYPES = (b"x", b"g")
_NPY_MAGIC = b"\x93NUMPY"


class ShardReadError(tarfile.ReadError):
    """A shard whose bytes are not a well-formed tar (truncated, bad checksum, bad number)."""


def _number(field: bytes, path: Path, what: str) -> int:
    if field and field[0] & 0x80:  # base-256 (GNU) for values that do not fit in octal
        return int.from_bytes(field[1:], "big")
    text = field.strip(b"\0 ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardReadError(f"{path}: tar header has a bad {what} field {field!r}") from None


def _checked_header(header: bytes, path: Path, offset: int) -> None:
    stored = _number(header[148:156], path, "checksum")
    if stored != sum(header[:148]) + 256 + sum(header[156:]):  # the checksum field counts as spaces
        raise ShardReadError(f"{path}: tar header at byte {offset} fails its checksum (corrupt shard)")


def _pax_records(data: bytes, path: Path) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records (length first, in bytes, including itself)."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0 or pos + length > len(data):
            raise ShardReadError(f"{path}: malformed PAX header record at byte {pos}")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8")
        pos += length
    return records


def tar_members(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each plain-file member, in order."""
    path, pax, offset = Path(path), {}, 0
    with open(path, "rb") as handle:
        while True:
            header = handle.read(BLOCK)
            if not header or header == bytes(BLOCK):  # end of archive
                return
            if len(header) < BLOCK:
                raise ShardReadError(f"{path}: truncated tar header at byte {offset}")
            _checked_header(header, path, offset)
            kind = header[156:157]
            size = int(pax["size"]) if "size" in pax else _number(header[124:136], path, "size")
            data = handle.read(size)
            handle.seek(-size % BLOCK, 1)
            if len(data) < size:
                raise ShardReadError(f"{path}: member at byte {offset} is cut short ({len(data)} of {size})")
            offset += BLOCK + size + (-size % BLOCK)
            if kind in _PAX_TYPES:
                pax = _pax_records(data, path) if kind == b"x" else pax
                continue
            name = pax.get("path") or _ustar_name(header)
            pax = {}
            if kind not in _FILE_TYPES:
                raise ValueError(f"{path}: refusing tar member {name!r} (links and paths are not allowed)")
            yield name, data


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode("utf-8")
    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if header[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def read_tar_samples(path: str | Path) -> Iterator[dict[str, bytes]]:
    """Group a shard's members into samples, refusing links and member names with path components."""
    current: dict[str, bytes] = {}
    for name, data in tar_members(path):
        if "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"{path}: refusing tar member {name!r} (links and paths are not allowed)")
        key, _, ext = name.partition(".")
        if current and current["__key__"] != key:
            yield current
            current = {}
        current["__key__"] = key
        current[ext] = data
    if current:
        yield current


@lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    meta = ast.literal_eval(header.decode("latin1"))
    return np.dtype(meta["descr"]), tuple(meta["shape"]), bool(meta["fortran_order"])


def load_npy(data: bytes) -> np.ndarray:
    """The array of ``.npy`` bytes (no pickles; read-only, sharing ``data``'s memory)."""
    if data[:6] != _NPY_MAGIC or data[6] not in (1, 2, 3):
        raise ValueError("not .npy data (bad magic or version)")
    width = 2 if data[6] == 1 else 4
    start = 8 + width
    end = start + int.from_bytes(data[8:start], "little")
    dtype, shape, fortran = _npy_header(data[start:end])
    if dtype.hasobject:
        raise ValueError(".npy data holds Python objects; only plain arrays are read")
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - end != count * dtype.itemsize:
        raise ValueError(f".npy data has {len(data) - end} payload bytes for shape {shape} of {dtype}")
    array = np.frombuffer(data, dtype, count, offset=end)
    return array.reshape(shape, order="F" if fortran else "C")


def text_rows(sample: dict[str, bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The packed sequences of one text-shard sample as ``(input_ids, doc_starts)`` pairs.

    A sample holds ``input_ids.npy`` of shape ``(sequences, seq_len)`` and ``doc_starts.npy``: where
    documents start in the flattened sample. Builds before text-builder 3 wrote one 1-D sequence per
    sample; those read as one row."""
    ids = load_npy(sample["input_ids.npy"])
    starts = load_npy(sample["doc_starts.npy"]) if "doc_starts.npy" in sample else np.zeros(0, np.int32)
    if ids.ndim == 1:
        return [(ids, starts)]
    if ids.ndim != 2:
        raise ValueError(f"input_ids.npy has shape {ids.shape}; a text sample is (sequences, seq_len)")
    length = ids.shape[1]
    rows = np.searchsorted(starts, np.arange(ids.shape[0] + 1) * length)
    return [(ids[i], starts[rows[i] : rows[i + 1]] - i * length) for i in range(ids.shape[0])]
