"""``make_samples(out_dir)``: the tiny profile's sample tree, written from the shape world of
``tasks.testkit.samples`` and the benchmark replicas of ``tasks.testkit.eval_samples``, with
``samples.json`` (the ``SampleSummary``: counts, config and the sha256 of every file) written last.
A complete tree for the same config is left as it is."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from tasks.core.identity import atomic_path, atomic_write_json, atomic_write_text, sha256_file
from tasks.testkit.eval_samples import make_eval_sets
from tasks.testkit.planted import plant
from tasks.testkit.sample_text import make_chats, make_subset
from tasks.testkit.samples import (
    GENERATOR_VERSION,
    QUESTION_TEMPLATES,
    REDPAJAMA_SUBSETS,
    SampleConfig,
    SampleSummary,
    config_json,
    json_text,
    jsonl_text,
    make_images,
    make_instruct,
    make_pretrain,
    make_urls_tsv,
    tokenizer_corpus,
)

logger = logging.getLogger(__name__)


def _write_tokenizer(out_dir: Path, texts: list[str], vocab_size: int) -> tuple[int, str]:
    """Train the tokenizer into ``out_dir/tokenizer`` (folder swapped in atomically); its size and hash."""
    from model.tokenizer import tokenizer_hash, train_tokenizer

    with atomic_path(out_dir / "tokenizer") as tmp:
        tokenizer = train_tokenizer(texts, vocab_size=vocab_size, out_dir=tmp)
    return len(tokenizer), tokenizer_hash(tokenizer)


def _write_images(out_dir: Path, files: dict[str, bytes]) -> None:
    """Write ``images/`` as a whole (stale files of an earlier config disappear with the old folder)."""
    with atomic_path(out_dir / "images") as tmp:
        tmp.mkdir()
        for name, data in files.items():
            (tmp / name).write_bytes(data)


def _write_tree(folder: Path, files: dict[str, bytes]) -> None:
    """Write a folder of files (relative path -> bytes) as a whole, replacing an earlier one."""
    with atomic_path(folder) as tmp:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)


def _file_hashes(out_dir: Path, relpaths: Iterable[str]) -> dict[str, str]:
    """sha256 of each listed file."""
    return {rel: sha256_file(out_dir / rel) for rel in sorted(relpaths)}


def _written_files(out_dir: Path, image_files: Iterable[str], eval_files: Iterable[str]) -> list[str]:
    """Relative paths of every file of the layout (``samples.json`` excluded)."""
    fixed = [f"redpajama/{s}.jsonl" for s in REDPAJAMA_SUBSETS]
    fixed += ["cc3m/urls.tsv", "llava/pretrain.json", "llava/instruct.json", "sharegpt/chat.json"]
    tokenizer = [p.relative_to(out_dir).as_posix() for p in (out_dir / "tokenizer").iterdir() if p.is_file()]
    return [f"images/{n}" for n in image_files] + [f"eval/{n}" for n in eval_files] + fixed + tokenizer


def load_summary(out_dir: Path) -> SampleSummary | None:
    """The summary in ``out_dir/samples.json``, or None when absent or unreadable."""
    path = Path(out_dir) / "samples.json"
    try:
        return SampleSummary.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_complete(out_dir: Path, config: SampleConfig) -> SampleSummary | None:
    """The existing summary when ``out_dir`` holds this config's samples with every file intact, else None."""
    summary = load_summary(out_dir)
    if summary is None or summary.generator != GENERATOR_VERSION or summary.config != config_json(config):
        return None
    for rel, digest in summary.files.items():
        path = Path(out_dir) / rel
        if not path.is_file() or sha256_file(path) != digest:
            logger.info("samples in %s: %s is missing or changed; regenerating", out_dir, rel)
            return None
    return summary


def make_samples(out_dir: Path, config: SampleConfig | None = None) -> SampleSummary:
    """Generate the tiny profile's sample data under ``out_dir`` (see the module docstring for the layout).

    Deterministic: the same config writes the same bytes. When ``out_dir/samples.json`` already
    describes this config and every listed file still has its recorded sha256, nothing is rewritten.
    """
    config = config or SampleConfig()
    config.validate()
    out_dir = Path(out_dir)
    start = time.perf_counter()
    existing = is_complete(out_dir, config)
    if existing is not None:
        logger.info("samples in %s are complete for this config; skipping", out_dir)
        return existing
    records, image_files = make_images(config)
    eval_files = make_eval_sets(config)
    plants = plant(records, image_files, eval_files)
    image_files.update(plants.files)
    _write_images(out_dir, image_files)
    _write_tree(out_dir / "eval", eval_files)
    all_docs, subset_counts = [], {}
    for subset in REDPAJAMA_SUBSETS:
        docs, subset_counts[subset] = make_subset(subset, config)
        atomic_write_text(out_dir / "redpajama" / f"{subset}.jsonl", jsonl_text(docs))
        all_docs += docs
    urls_text, url_counts = make_urls_tsv(records, config, plants.url_rows)
    atomic_write_text(out_dir / "cc3m" / "urls.tsv", urls_text)
    pretrain = make_pretrain(records, config) + plants.pretrain
    instruct, question_types = make_instruct(records, config)
    instruct += plants.instruct
    chats = make_chats(config) + plants.chats
    for rel, data in (
        ("llava/pretrain.json", pretrain),
        ("llava/instruct.json", instruct),
        ("sharegpt/chat.json", chats),
    ):
        atomic_write_text(out_dir / rel, json_text(data))
    texts = tokenizer_corpus(all_docs, records, [*pretrain, *instruct, *chats])
    vocab, tok_hash = _write_tokenizer(out_dir, texts, config.vocab_size)
    summary = SampleSummary(
        generator=GENERATOR_VERSION,
        seed=config.seed,
        config=config_json(config),
        n_images=len(records),
        n_single_shape=sum(r.count == 1 for r in records),
        images=records,
        redpajama=subset_counts,
        cc3m=url_counts,
        pretrain_samples=len(pretrain),
        instruct_samples=len(instruct),
        instruct_rounds=sum(len(e["conversations"]) // 2 for e in instruct),
        instruct_questions={t: question_types.get(t, 0) for t in QUESTION_TEMPLATES},
        chats=len(chats),
        chat_turns=sum(len(c["conversations"]) for c in chats),
        tokenizer_vocab_size=vocab,
        tokenizer_hash=tok_hash,
        planted=plants.summary,
    )
    summary.files = _file_hashes(out_dir, _written_files(out_dir, image_files, eval_files))
    atomic_write_json(out_dir / "samples.json", summary.to_json())
    logger.debug(  # the CLI prints its own one-line summary
        "wrote samples to %s in %.1fs: %d images, %d docs, vocab %d",
        out_dir,
        time.perf_counter() - start,
        len(records),
        len(all_docs),
        vocab,
    )
    return summary
