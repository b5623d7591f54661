"""Training loader: deterministic, disjoint across ranks and workers, weighted mixture, exact resume."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.data.shards import write_shard
from tasks.train.loader import LoaderConfig, Source, batches, mixture


def _text_source(root: Path, name: str, shards: int, per_shard: int, weight: float = 1.0) -> Source:
    paths = []
    for s in range(shards):
        samples = [
            {"__key__": f"{name}-{s}-{i}", "input_ids.npy": _npy(np.full(8, 1000 * s + i, dtype=np.uint16)),
             "doc_starts.npy": _npy(np.zeros(1, dtype=np.int32))}
            for i in range(per_shard)
        ]  # fmt: skip
        rec = write_shard(root, f"{name}-{s}.tar", samples, "train", name)
        paths.append(str(root / rec.path))
    return Source(name, "text", tuple(paths), shards * per_shard, weight)


def _packed_source(root: Path, name: str, shards: int, per_shard: int, per_sample: int) -> Source:
    """Text shards as text-builder 3 writes them: ``per_sample`` sequences in each tar sample."""
    paths = []
    for s in range(shards):
        ids = [1000 * s + i for i in range(per_shard)]
        samples = [
            {"__key__": f"{name}-{s}-{j}", "__samples__": len(rows),
             "input_ids.npy": _npy(np.stack([np.full(8, v, dtype=np.uint16) for v in rows])),
             "doc_starts.npy": _npy(np.arange(0, 8 * len(rows), 8, dtype=np.int32))}
            for j, rows in enumerate(ids[k : k + per_sample] for k in range(0, per_shard, per_sample))
        ]  # fmt: skip
        rec = write_shard(root, f"{name}-{s}.tar", samples, "train", name)
        assert rec.samples == per_shard
        paths.append(str(root / rec.path))
    return Source(name, "text", tuple(paths), shards * per_shard, 1.0)


def test_packed_text_samples_are_read_as_one_training_sample_per_sequence(tmp_path: Path) -> None:
    """A packed build and a one-sequence-per-sample build of the same sequences give the same epoch
    (every sequence once, split across ranks by sequence), and resume still skips exactly."""
    packed = _cfg((_packed_source(tmp_path / "p", "a", shards=2, per_shard=12, per_sample=5),))
    flat = _cfg((_text_source(tmp_path / "f", "a", shards=2, per_shard=12),))
    for cfg in (packed, flat):
        seen = [
            i for rank in range(2) for b in _take(batches(cfg, rank, 2, {}, workers=0), 3) for i in _ids(b)
        ]
        assert sorted(seen) == sorted(1000 * s + i for s in range(2) for i in range(12))
    first = [_ids(b) for b in _take(batches(packed, 0, 1, {}, workers=0), 5)]
    resumed = [_ids(b) for b in _take(batches(packed, 0, 1, {"epoch": 0, "batches": 2}, workers=0), 3)]
    assert resumed == first[2:]


def _take(stream, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(stream)[0] for _ in range(n)]


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _cfg(sources: tuple[Source, ...], micro_batch: int = 4, **kw) -> LoaderConfig:
    return LoaderConfig(sources, micro_batch, 8, None, None, 0, "pad", seed=7, shuffle_buffer=16, **kw)


def _ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_ranks_and_workers_read_disjoint_samples_covering_the_epoch(tmp_path: Path) -> None:
    cfg = _cfg((_text_source(tmp_path, "a", shards=6, per_shard=16),))
    seen: list[int] = []
    for rank in range(2):
        for workers in (0, 2):
            stream = batches(cfg, rank, 2, {}, workers=workers)
            ids = [i for _ in range(12) for i in _ids(next(stream)[0])]  # 96 samples / (2 ranks x 4) = 12
            if workers == 0:
                seen += ids
            assert len(set(ids)) == 48
    assert sorted(seen) == sorted(1000 * s + i for s in range(6) for i in range(16))


def test_many_shards_are_split_by_shard(tmp_path: Path) -> None:
    cfg = _cfg((_text_source(tmp_path, "a", shards=16, per_shard=8),))
    per_rank = [
        {i for _ in range(16) for i in _ids(next(s)[0])} for s in (batches(cfg, r, 2, {}) for r in range(2))
    ]
    shards_of = [{i // 1000 for i in ids} for ids in per_rank]
    assert not per_rank[0] & per_rank[1] and not shards_of[0] & shards_of[1]
    assert len(shards_of[0]) == len(shards_of[1]) == 8


def test_same_seed_same_batches_other_epoch_other_order(tmp_path: Path) -> None:
    cfg = _cfg((_text_source(tmp_path, "a", shards=4, per_shard=16),))
    first = [_ids(next(s)[0]) for s in [batches(cfg, 0, 1, {})] for _ in range(16)]
    again = [_ids(next(s)[0]) for s in [batches(cfg, 0, 1, {})] for _ in range(16)]
    assert first == again
    later = batches(cfg, 0, 1, {"epoch": 1, "batches": 0})
    assert [_ids(next(later)[0]) for _ in range(16)] != first


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_from_a_position_gives_the_same_batches(tmp_path: Path, workers: int) -> None:
    cfg = _cfg((_text_source(tmp_path, "a", shards=4, per_shard=20), _text_source(tmp_path, "b", 2, 20, 3.0)))
    stream = batches(cfg, 1, 2, {}, workers=workers)
    run = [next(stream) for _ in range(25)]  # crosses an epoch boundary (120 samples / 2 ranks / 4 = 15)
    for k in (3, 11, 15, 17):
        resumed = batches(cfg, 1, 2, run[k - 1][1], workers=workers)
        assert [_ids(next(resumed)[0]) for _ in range(5)] == [_ids(b) for b, _ in run[k : k + 5]]
    assert run[14][1] == {"epoch": 0, "batches": 15} and run[15][1] == {"epoch": 1, "batches": 1}


def test_mixture_follows_the_weights(tmp_path: Path) -> None:
    a = _text_source(tmp_path, "a", 2, 50, weight=1.0)
    b = _text_source(tmp_path, "b", 2, 50, weight=3.0)
    drawn = Counter(
        s["__source__"] for _, s in zip(range(2000), mixture(_cfg((a, b)), 0, 0, 1), strict=False)
    )
    assert drawn["b"] / 2000 == pytest.approx(0.75, abs=0.03)


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path, tiny_tokenizer) -> None:
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    good = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(good, format="JPEG")
    samples = [
        {"__key__": f"s{i}", "jpg": good.getvalue() if i % 5 else b"not a jpeg", "txt": b"a red square"}
        for i in range(40)
    ]
    rec = write_shard(tmp_path, "it.tar", samples, "train", "it")
    src = Source("it", "image_text", (str(tmp_path / rec.path),), 40, 1.0)
    cfg = LoaderConfig((src,), 4, 64, "plain", str(tmp_path / "tok"), 28, "pad", seed=0)
    stream = batches(cfg, 0, 1, {})
    got = [next(stream)[0] for _ in range(8)]
    assert all(b["images"].shape == (4, 3, 28, 28) for b in got)
    assert int(got[-1]["skipped_samples"]) == 8  # 8 of the 40 samples are not images
    labels = got[0]["labels"][0].tolist()
    assert labels[0] == -100 and -200 in got[0]["input_ids"][0].tolist()


def test_group_by_modality_keeps_batches_single_modality(tmp_path: Path, tiny_tokenizer) -> None:
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    img = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 0, 200)).save(img, format="JPEG")
    conv = lambda image: json.dumps({"conversations": [  # noqa: E731
        {"from": "human", "value": ("<image>\n" if image else "") + "What colour?"},
        {"from": "gpt", "value": "blue"}]}).encode()  # fmt: skip
    samples = [
        {"__key__": f"s{i}", "json": conv(i % 2 == 0), **({"jpg": img.getvalue()} if i % 2 == 0 else {})}
        for i in range(64)
    ]
    rec = write_shard(tmp_path, "mix.tar", samples, "train", "mix")
    src = Source("mix", "instruct", (str(tmp_path / rec.path),), 64, 1.0)
    cfg = LoaderConfig((src,), 4, 128, "v1", str(tmp_path / "tok"), 28, "pad", seed=0,
                       group_by_modality_length=True)  # fmt: skip
    stream = batches(cfg, 0, 1, {})
    for _ in range(16):
        batch = next(stream)[0]
        with_image = (batch["input_ids"] == -200).any(dim=1)
        assert with_image.all() or not with_image.any()


def test_text_is_cut_to_seq_len_before_the_image_is_spliced_in(tmp_path: Path, tiny_tokenizer) -> None:
    """As the authors' preprocessing (``model_max_length`` on the text ids, then the visual tokens
    replace the placeholder): a long conversation keeps seq_len text tokens, image or not."""
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    img = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 0, 200)).save(img, format="JPEG")
    turns = [{"from": "human", "value": "<image>\nWhat colour is the big square in the picture?"},
             {"from": "gpt", "value": "It is blue. " * 80}]  # fmt: skip
    record = json.dumps({"conversations": turns}).encode()
    samples = [{"__key__": f"s{i}", "json": record, "jpg": img.getvalue()} for i in range(8)]
    rec = write_shard(tmp_path, "long.tar", samples, "train", "long")
    src = Source("long", "instruct", (str(tmp_path / rec.path),), 8, 1.0)
    cfg = LoaderConfig((src,), 4, 160, "v1", str(tmp_path / "tok"), 28, "pad", seed=0)
    batch = next(batches(cfg, 0, 1, {}))[0]
    assert batch["input_ids"].shape[1] == 160  # text ids, the image placeholder among them
    assert (batch["input_ids"] == -200).sum(dim=1).tolist() == [1, 1, 1, 1]
    assert (batch["labels"][:, -1] != -100).all()  # the cut falls in the answer, which still trains
