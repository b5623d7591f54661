"""Training data: webdataset shards streamed deterministically, mixed by weight, split by rank and worker.

Every (rank, loader worker) pair reads its own slice of the shards with a seeded shard order and
shuffle buffer, and mixes sources (build x subset) by weight with a seeded generator, so the
stream is a pure function of (seed, epoch, rank, worker). The position is the number of batches
consumed in the epoch: resuming recreates the stream and skips them, which reproduces the exact
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tasks.data.shard_read import load_npy, read_tar_samples, text_rows

log = logging.getLogger(__name__)
SHARDS_PER_STREAM = 4
"""Streams split by whole shards only when each gets at least this many; otherwise by sample."""


@dataclass(frozen=True)
class Source:
    """Samples of one subset of one build."""

    name: str
    """``<spec>/<subset>``."""
    kind: str
    """Dataset kind: text, image_text, instruct, chat."""
    shards: tuple[str, ...]
    """Absolute shard paths."""
    samples: int
    """Samples in those shards."""
    weight: float
    """Mixture weight (dataset weight x subset weight)."""


@dataclass(frozen=True)
class LoaderConfig:
    """How a stage turns sources into batches."""

    sources: tuple[Source, ...]
    """Weighted sources."""
    micro_batch: int
    """Samples per batch."""
    seq_len: int
    """Maximum text tokens per sample, as the authors' ``model_max_length``: text is cut to it before
    the image is spliced in, so a sample with an image reaches ``seq_len + visual tokens - 1``."""
    template: str | None
    """Conversation template for image/conversation kinds."""
    tokenizer_path: str | None
    """Tokenizer for image/conversation kinds."""
    image_size: int
    """Vision tower input size (0 for text-only models)."""
    image_mode: str
    """``pad`` or ``resize_crop``."""
    seed: int
    """Seed of shard order, shuffle buffers and mixture draws."""
    shuffle_buffer: int = 256
    """Samples in each stream's shuffle buffer."""
    group_by_modality_length: bool = False
    """Batch samples of one modality and similar length together (within a window)."""
    pad_id: int = 0
    """Padding token id."""

    @property
    def total_samples(self) -> int:
        """Samples in all sources."""
        return sum(s.samples for s in self.sources)


def _rng(*parts: Any) -> random.Random:
    return random.Random("/".join(map(str, parts)))


def source_stream(source: Source, cfg: LoaderConfig, epoch: int, part: int, parts: int) -> Iterator[dict]:
    """Raw samples of ``source`` for one (epoch, part of ``parts``), shuffled deterministically."""
    shards = list(source.shards)
    _rng(cfg.seed, epoch, source.name, "shards").shuffle(shards)
    by_shard = len(shards) >= SHARDS_PER_STREAM * parts  # else every stream reads all shards, keeps 1/parts
    mine = shards[part::parts] if by_shard else shards
    rng = _rng(cfg.seed, epoch, source.name, part, "buffer")
    buffer: list[dict] = []
    index = 0
    for shard in mine:
        for sample in _training_samples(shard, source.kind):
            index += 1
            if not by_shard and (index - 1) % parts != part:
                continue
            sample["__source__"] = source.name
            sample["__kind__"] = source.kind
            buffer.append(sample)
            if len(buffer) >= cfg.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def _training_samples(shard: str, kind: str) -> Iterator[dict]:
    """A shard's samples; a text sample packs several sequences, each becomes one training sample."""
    for sample in read_tar_samples(shard):
        if kind != "text":
            yield sample
            continue
        try:
            rows = text_rows(sample)
        except (KeyError, ValueError):  # the processor counts and logs it as one bad sample
            yield sample
            continue
        for i, (ids, _) in enumerate(rows):
            yield {"__key__": f"{sample['__key__']}/{i}", "input_ids": ids}


def mixture(cfg: LoaderConfig, epoch: int, part: int, parts: int) -> Iterator[dict]:
    """Samples drawn from the sources by weight; an exhausted source restarts (next cycle)."""
    streams = {s.name: source_stream(s, cfg, epoch, part, parts) for s in cfg.sources}
    cycles = Counter()
    names = [s.name for s in cfg.sources]
    weights = [s.weight for s in cfg.sources]
    rng = _rng(cfg.seed, epoch, part, "mixture")
    while True:
        name = rng.choices(names, weights)[0]
        try:
            yield next(streams[name])
        except StopIteration:
            cycles[name] += 1
            source = next(s for s in cfg.sources if s.name == name)
            streams[name] = source_stream(source, cfg, epoch * 1000 + cycles[name], part, parts)
            yield next(streams[name])


class SampleProcessor:
    """Raw shard samples -> token ids, labels and pixel tensors (bad samples are counted, not raised)."""

    def __init__(self, cfg: LoaderConfig) -> None:
        self.cfg = cfg
        self.tokenizer = None
        if cfg.tokenizer_path:
            from model.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(cfg.tokenizer_path)
        self.skipped: Counter[str] = Counter()

    def __call__(self, sample: dict) -> dict[str, Any] | None:
        try:
            return self._process(sample)
        except Exception as err:  # a corrupt sample must not stop training: skip and count it
            reason = type(err).__name__
            self.skipped[reason] += 1
            log.warning(
                "skipping sample %s from %s: %s", sample.get("__key__"), sample.get("__source__"), err
            )
            return None

    def _process(self, sample: dict) -> dict[str, Any]:
        kind = sample["__kind__"]
        if kind == "text":
            ids = sample["input_ids"] if "input_ids" in sample else load_npy(sample["input_ids.npy"])
            ids = ids[: self.cfg.seq_len].astype(np.int64)
            return {"input_ids": ids, "labels": ids, "image": None}  # collate copies, so one array serves
        from model.conversation import move_image_to_front, tokenize_conversation

        image = self._image(sample["jpg"]) if "jpg" in sample else None
        if kind == "image_text":
            caption = sample["txt"].decode("utf-8").strip()
            conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]
        else:
            conv = json.loads(sample["json"])["conversations"]
            if image is not None:
                conv = move_image_to_front(conv)
        template = self.cfg.template or "v1"
        out = tokenize_conversation(conv, self.tokenizer, template, max_length=self.cfg.seq_len)
        return {**out, "image": image}

    def _image(self, data: bytes) -> torch.Tensor:
        from PIL import Image

        from model.image import preprocess_image

        with Image.open(io.BytesIO(data)) as img:
            return preprocess_image(img, self.cfg.image_size, self.cfg.image_mode)  # type: ignore[arg-type]


def collate(samples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, labels (-100 on padding) and mask; images stacked in sample order."""
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.as_tensor(s["input_ids"])
        labels[i, :n] = torch.as_tensor(s["labels"])
        mask[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    images = [s["image"] for s in samples if s["image"] is not None]
    if images:
        batch["images"] = torch.stack(images)
    return batch


def _chunks(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive batches of ``size`` samples (a short tail is dropped)."""
    while len(chunk := [s for _, s in zip(range(size), samples, strict=False)]) == size:
        yield chunk


def _grouped(samples: Iterator[dict], size: int, window: int = 8) -> Iterator[list[dict]]:
    """Batches of one modality and similar length: windows of ``window`` batches are split by modality,
    sorted by length and cut into full batches; a modality's leftovers wait for the next window."""
    pending: dict[bool, list[dict]] = {False: [], True: []}
    for pool in _chunks(samples, size * window):
        for sample in pool:
            pending[sample["image"] is not None].append(sample)
        for modality in (False, True):
            items = sorted(pending[modality], key=lambda s: len(s["input_ids"]))
            full = len(items) // size * size
            yield from (items[i : i + size] for i in range(0, full, size))
            pending[modality] = items[full:]


class EpochDataset(torch.utils.data.IterableDataset):
    """One epoch of one rank's batches; batch ``i`` comes from sample stream ``i % W`` (W loader workers)."""

    def __init__(
        self, cfg: LoaderConfig, rank: int, world: int, epoch: int, done: int, per_epoch: int
    ) -> None:
        super().__init__()
        self.cfg, self.rank, self.world = cfg, rank, world
        self.epoch, self.done, self.per_epoch = epoch, done, per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        w, workers = (info.id, info.num_workers) if info else (0, 1)
        # Batch i always comes from stream i % workers; the DataLoader hands out batches round-robin
        # starting at worker 0, so after resuming at `done` worker w serves stream (w + done) % workers.
        stream = (w + self.done) % workers
        processor = SampleProcessor(self.cfg)
        part, parts = self.rank * workers + stream, self.world * workers
        processed = (p for p in map(processor, mixture(self.cfg, self.epoch, part, parts)) if p is not None)
        make = _grouped if self.cfg.group_by_modality_length else _chunks
        mine = range(stream, self.per_epoch, workers)  # global batch indices of this stream
        for index, group in zip(mine, make(processed, self.cfg.micro_batch), strict=False):
            if index >= self.done:
                batch = collate(group, self.cfg.pad_id)
                batch["skipped_samples"] = torch.tensor(sum(processor.skipped.values()))
                yield batch


def batches(
    cfg: LoaderConfig, rank: int, world: int, position: dict[str, int], workers: int = 0
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, int]]]:
    """``(batch, position_after)`` forever, epoch after epoch, starting at ``position``.

    An epoch is ``total_samples // (world x micro_batch)`` batches per rank.
    """
    epoch, done = position.get("epoch", 0), position.get("batches", 0)
    per_epoch = max(1, cfg.total_samples // (world * cfg.micro_batch))
    while True:
        dataset = EpochDataset(cfg, rank, world, epoch, done, per_epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
        for index, batch in enumerate(loader, start=done):
            yield batch, {"epoch": epoch, "batches": index + 1}
        epoch, done = epoch + 1, 0
