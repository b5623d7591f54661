"""llama.cpp from the package registry: the real LLaMA tokenizer and llama.cpp's own programs, offline.

No model hub is reachable from CI, but the source distribution of the installed llama-cpp-python
(downloaded once with pip, so the configured index is used, and kept in the cache folder) carries
llama.cpp at the commit the in-process backend runs:

* ``vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf``: the LLaMA SentencePiece vocabulary MobileLLaMA
  uses (32,000 pieces with their scores and types) and, beside it, llama.cpp's tokenizer test cases
  (``.gguf.inp``: texts, ``.gguf.out``: their ids). ``fetch_llama_vocab`` keeps the three files;
  ``released_tokenizer`` writes the vocabulary as the ``tokenizer.model`` folder a released MobileLLaMA
  ships.
* ``build_programs`` compiles ``llama-completion``, ``llama-mtmd-cli`` and ``llama-bench`` (CMake, CPU)
  for the binary device backend, as a board's runner has them.

    python -m tasks.testkit.llama_cpp_source vocab [CACHE_DIR]      # or: make llama-vocab
    python -m tasks.testkit.llama_cpp_source programs [CACHE_DIR]   # or: make llama-cpp-programs
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


class LlamaCppSourceError(RuntimeError):
    """llama.cpp's source could not be fetched from the package registry, or not built."""


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
            raise LlamaCppSourceError(f"{self.folder}: {len(parts)} test texts but {len(ids)} id lines")
        return [(text, [int(t) for t in line.split()]) for text, line in zip(parts, ids, strict=True)]


def default_cache() -> Path:
    """``$MVLM_CACHE``, else ``$XDG_CACHE_HOME/mvlm`` (``~/.cache/mvlm``)."""
    if os.environ.get("MVLM_CACHE"):
        return Path(os.environ["MVLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mvlm"


def fetch_sdist(cache: Path | None = None) -> Path:
    """The installed llama-cpp-python version's source archive (downloaded once into the cache)."""
    release = version("llama-cpp-python")
    folder = (cache or default_cache()) / "llama-cpp-python"
    kept = folder / f"llama_cpp_python-{release}.tar.gz"
    if kept.is_file():
        return kept
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        os.replace(_download_sdist(release, Path(tmp)), kept)
    return kept


def fetch_llama_vocab(cache: Path | None = None) -> LlamaVocab:
    """The vocabulary files of the installed llama-cpp-python version (extracted once)."""
    folder = (cache or default_cache()) / "llama-vocab" / version("llama-cpp-python")
    if all((folder / name).is_file() for name in MEMBERS):
        return LlamaVocab(folder)
    sdist = fetch_sdist(cache)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        staged = Path(tmp) / "files"
        _extract(sdist, staged)
        if folder.exists():  # a partial folder from an earlier try, or another process's
            for name in MEMBERS:
                os.replace(staged / name, folder / name)
        else:
            os.replace(staged, folder)
    log.info("llama.cpp's LLaMA vocabulary (%s) in %s", sdist.name, folder)
    return LlamaVocab(folder)


def _download_sdist(release: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={release}", "-d", str(into)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        log.debug("pip download failed:\n%s", done.stderr)
        raise LlamaCppSourceError(
            f"could not download llama-cpp-python {release}'s source from the package registry "
            f"(pip exit {done.returncode}; its output is in the log): check that the index pip uses is "
            f"reachable, or put llama_cpp_python-{release}.tar.gz into {default_cache() / 'llama-cpp-python'}"
        )
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise LlamaCppSourceError(f"pip downloaded no llama-cpp-python source archive into {into}")
    return found[0]


def _extract(sdist: Path, folder: Path) -> None:
    folder.mkdir()
    with tarfile.open(sdist) as archive:
        members = {Path(m.name).name: m for m in archive.getmembers() if "/models/" in m.name}
        for name in MEMBERS:
            member = members.get(name)
            source = archive.extractfile(member) if member else None
            if source is None:
                raise LlamaCppSourceError(f"{sdist.name} has no vendor/llama.cpp/models/{name}")
            (folder / name).write_bytes(source.read())


def released_tokenizer(vocab: LlamaVocab, folder: Path) -> Path:
    """A folder as the released MobileLLaMA ships its tokenizer: ``tokenizer.model`` only, written
    from the vocabulary GGUF's pieces, scores and types."""
    from model.spm import read_gguf_pieces, write_tokenizer_model

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer_model(read_gguf_pieces(vocab.gguf), folder / "tokenizer.model")
    return folder


PROGRAMS = ("llama-completion", "llama-mtmd-cli", "llama-bench")
_CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF",
)  # fmt: skip


def programs_folder(cache: Path | None = None) -> Path:
    """Where ``build_programs`` puts the programs of the installed llama-cpp-python version."""
    return (cache or default_cache()) / "llama-cpp-bin" / version("llama-cpp-python")


def build_programs(cache: Path | None = None, jobs: int = 2) -> Path:
    """Compile llama.cpp's ``PROGRAMS`` (CPU, static) from the sdist once; returns their folder."""
    out = programs_folder(cache)
    if all((out / p).is_file() for p in PROGRAMS):
        return out
    sdist = fetch_sdist(cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = Path(tmp) / "build"
        _cmake(["-S", str(source), "-B", str(build), *_CMAKE_OPTIONS], build.parent / "cmake.log")
        _cmake(["--build", str(build), "-j", str(jobs), "--target", *PROGRAMS], build.parent / "cmake.log")
        staged = Path(tmp) / "bin"
        staged.mkdir()
        for program in PROGRAMS:
            os.replace(build / "bin" / program, staged / program)
        os.replace(staged, out)
    log.info("llama.cpp programs (%s) in %s", sdist.name, out)
    return out


def _cmake(args: list[str], log_file: Path) -> None:
    with log_file.open("a") as sink:
        done = subprocess.run(["cmake", *args], stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-30:]
        log.error("cmake %s failed:\n%s", args[0], "\n".join(tail))
        raise LlamaCppSourceError(
            f"building llama.cpp's programs failed (cmake {args[0]}: exit {done.returncode}); the last lines "
            "of its output are in the log; a C/C++ toolchain and cmake are needed"
        )


if __name__ == "__main__":
    what, cache = sys.argv[1], Path(sys.argv[2]) if len(sys.argv) > 2 else None
    print(fetch_llama_vocab(cache).folder if what == "vocab" else build_programs(cache, os.cpu_count() or 2))
