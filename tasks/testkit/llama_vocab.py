"""The real LLaMA tokenizer, offline: llama.cpp's test vocabulary from the package registry.

No model hub is reachable from CI, but llama-cpp-python's source distribution carries llama.cpp's
tokenizer test files: ``vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf`` (the LLaMA SentencePiece
vocabulary MobileLLaMA uses, 32,000 pieces with their scores and types) and, beside it, llama.cpp's
test cases (``.gguf.inp``: texts, ``.gguf.out``: their ids). ``fetch_llama_vocab`` downloads the sdist
of the installed llama-cpp-python version with pip (so the configured index is used) and keeps the
three files in a cache folder; ``released_tokenizer`` writes the vocabulary as the ``tokenizer.model``
folder a released MobileLLaMA ships.

    python -m tasks.testkit.llama_vocab [CACHE_DIR]     # or: make llama-vocab
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

log = logging.getLogger(__name__)

VOCAB_FILE = "ggml-vocab-llama-spm.gguf"
MEMBERS = (VOCAB_FILE, f"{VOCAB_FILE}.inp", f"{VOCAB_FILE}.out")
CASE_SEPARATOR = "\n__ggml_vocab_test__\n"  # llama.cpp tests/test-tokenizer-0.cpp


class VocabFetchError(RuntimeError):
    """The vocabulary could not be fetched from the package registry."""


@dataclass(frozen=True)
class LlamaVocab:
    """The fetched files."""

    folder: Path
    """Folder holding ``ggml-vocab-llama-spm.gguf`` and its ``.inp`` / ``.out`` test cases."""

    @property
    def gguf(self) -> Path:
        """The vocabulary GGUF (no tensors)."""
        return self.folder / VOCAB_FILE

    def cases(self) -> list[tuple[str, list[int]]]:
        """llama.cpp's tokenizer test cases: (text, ids without bos), read as its harness reads them."""
        texts = (self.folder / MEMBERS[1]).read_text(encoding="utf-8")
        ids = (self.folder / MEMBERS[2]).read_text(encoding="utf-8").splitlines()
        parts = texts.split(CASE_SEPARATOR)
        if parts and parts[-1] == "" and texts.endswith(CASE_SEPARATOR):
            parts.pop()  # the harness stops at the last separator
        if len(parts) != len(ids):
            raise VocabFetchError(f"{self.folder}: {len(parts)} test texts but {len(ids)} id lines")
        return [(text, [int(t) for t in line.split()]) for text, line in zip(parts, ids, strict=True)]


def default_cache() -> Path:
    """``$MVLM_CACHE``, else ``$XDG_CACHE_HOME/mvlm`` (``~/.cache/mvlm``)."""
    if os.environ.get("MVLM_CACHE"):
        return Path(os.environ["MVLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mvlm"


def fetch_llama_vocab(cache: Path | None = None) -> LlamaVocab:
    """The vocabulary files of the installed llama-cpp-python version (downloaded once)."""
    release = version("llama-cpp-python")
    folder = (cache or default_cache()) / "llama-vocab" / release
    if all((folder / name).is_file() for name in MEMBERS):
        return LlamaVocab(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        sdist = _download_sdist(release, Path(tmp))
        staged = Path(tmp) / "files"
        _extract(sdist, staged)
        if folder.exists():  # a partial folder from an earlier try, or another process's
            for name in MEMBERS:
                os.replace(staged / name, folder / name)
        else:
            os.replace(staged, folder)
    log.info("llama.cpp's LLaMA vocabulary (llama-cpp-python %s) in %s", release, folder)
    return LlamaVocab(folder)


def _download_sdist(release: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={release}", "-d", str(into)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        log.debug("pip download failed:\n%s", done.stderr)
        raise VocabFetchError(
            f"could not download llama-cpp-python {release}'s source from the package registry "
            f"(pip exit {done.returncode}; its output is in the log): check that the index pip uses is "
            "reachable, or put the three files "
            f"{', '.join(MEMBERS)} into {default_cache() / 'llama-vocab' / release}"
        )
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise VocabFetchError(f"pip downloaded no llama-cpp-python source archive into {into}")
    return found[0]


def _extract(sdist: Path, folder: Path) -> None:
    folder.mkdir()
    with tarfile.open(sdist) as archive:
        members = {Path(m.name).name: m for m in archive.getmembers() if "/models/" in m.name}
        for name in MEMBERS:
            member = members.get(name)
            source = archive.extractfile(member) if member else None
            if source is None:
                raise VocabFetchError(f"{sdist.name} has no vendor/llama.cpp/models/{name}")
            (folder / name).write_bytes(source.read())


def released_tokenizer(vocab: LlamaVocab, folder: Path) -> Path:
    """A folder as the released MobileLLaMA ships its tokenizer: ``tokenizer.model`` only, written
    from the vocabulary GGUF's pieces, scores and types."""
    from model.spm import read_gguf_pieces, write_tokenizer_model

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer_model(read_gguf_pieces(vocab.gguf), folder / "tokenizer.model")
    return folder


if __name__ == "__main__":
    print(fetch_llama_vocab(Path(sys.argv[1]) if len(sys.argv) > 1 else None).folder)
