"""The fast shard reader: the same samples as Python's tarfile on our shards, the same refusals (links,
paths), corrupt and truncated tars named as such; ``load_npy`` equals ``np.load``."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tasks.data.shard_read import ShardReadError, load_npy, read_tar_samples, tar_members
from tasks.data.shards import npy_bytes, write_shard


def _tarfile_samples(path: Path) -> list[dict[str, bytes]]:
    out: list[dict[str, bytes]] = []
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if not out or out[-1]["__key__"] != key:
                out.append({"__key__": key})
            out[-1][ext] = tar.extractfile(member).read()
    return out


def test_our_shards_read_as_tarfile_reads_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    samples = [
        {
            "__key__": f"web-00000-{i:08d}",
            "input_ids.npy": npy_bytes(rng.integers(0, 32000, 2048 if i % 2 else 7).astype(np.uint16)),
            "doc_starts.npy": npy_bytes(np.asarray([0, 5], dtype=np.int32)),
            "jpg": rng.bytes(513 * i),  # sizes around the 512-byte blocks, and empty
            "json": ('{"caption": "' + "é" * i + '"}').encode(),
        }
        for i in range(6)
    ]
    expected = [{k: v for k, v in s.items()} for s in samples]
    write_shard(tmp_path, "shards/train/web-00000-00000.tar", samples, "train", "web")
    shard = tmp_path / "shards/train/web-00000-00000.tar"
    assert list(read_tar_samples(shard)) == _tarfile_samples(shard) == expected


def _tar(path: Path, members: list[tarfile.TarInfo], data: bytes = b"") -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def test_links_paths_and_long_names_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("a.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    nested = tarfile.TarInfo("dir/a.txt")
    nested.size = 1
    long_pax = tarfile.TarInfo("x" * 120 + "/a.txt")  # PAX path record
    long_pax.size = 1
    for name, member in (("link", link), ("nested", nested), ("long", long_pax)):
        with pytest.raises(ValueError, match=r"refusing tar member .*links and paths are not allowed"):
            list(read_tar_samples(_tar(tmp_path / f"{name}.tar", [member], b"x")))


def test_corrupt_and_truncated_tars_are_named(tmp_path: Path) -> None:
    good = tarfile.TarInfo("k.bin")
    good.size = 2000
    shard = _tar(tmp_path / "good.tar", [good], b"y" * 2000)
    raw = shard.read_bytes()
    corrupt = bytearray(raw)
    corrupt[10] ^= 0xFF  # inside the member's header
    (tmp_path / "corrupt.tar").write_bytes(bytes(corrupt))
    with pytest.raises(ShardReadError, match=r"corrupt\.tar: tar header at byte 0 fails its checksum"):
        list(tar_members(tmp_path / "corrupt.tar"))
    (tmp_path / "short.tar").write_bytes(raw[: 512 + 700])
    with pytest.raises(ShardReadError, match=r"short\.tar: member at byte 0 is cut short \(700 of 2000\)"):
        list(tar_members(tmp_path / "short.tar"))
    assert isinstance(ShardReadError("x"), tarfile.TarError)  # callers that catch tarfile's errors still do


@pytest.mark.parametrize(
    "array",
    [
        np.arange(7, dtype=np.uint16),
        np.arange(12, dtype=np.int32).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
        np.array(5, dtype=np.int64),
        np.zeros((0,), dtype=np.int32),
    ],
)
def test_load_npy_equals_np_load(array: np.ndarray) -> None:
    data = npy_bytes(array)
    ours, theirs = load_npy(data), np.load(io.BytesIO(data))
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and np.array_equal(ours, theirs)


def test_load_npy_refuses_objects_and_wrong_lengths() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="holds Python objects"):
        load_npy(buffer.getvalue())
    with pytest.raises(ValueError, match="payload bytes for shape"):
        load_npy(npy_bytes(np.arange(4, dtype=np.int32))[:-1])
    with pytest.raises(ValueError, match=r"not \.npy data"):
        load_npy(b"PK\x03\x04 not numpy")
