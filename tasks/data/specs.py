"""Dataset specs: one YAML file per dataset in ``data_specs/``, validated against a typed schema.

Adding a dataset is adding a file: the folder is scanned, every file is validated, and errors name
the file, the line, the field path and the allowed values. YAML is loaded with the safe loader;
duplicate and unknown keys are errors. Credentials are only ever environment references
(``${HF_TOKEN}``), resolved at use time and never stored.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tasks.core.yaml_lines import has, inner_model, parse_yaml, problems_of
from tasks.data.spec_options import Decontaminate, Dedup, Download, Filters, Strict

SPEC_DIR = Path(__file__).resolve().parents[2] / "data_specs"
ENV_REF = re.compile(r"^\$\{([A-Z_][A-Z0-9_]*)\}$")


_Strict = Strict


class HFSource(_Strict):
    """A Hugging Face hub dataset, read with ``datasets`` in streaming mode."""

    type: Literal["hf"]
    """Source kind."""
    dataset: str
    """Hub dataset id, e.g. ``togethercomputer/RedPajama-Data-1T``."""
    revision: str
    """Pinned git revision (branch, tag or commit) so builds are reproducible."""
    config: str | None = None
    """Dataset configuration name (RedPajama: the subset)."""
    split: str = "train"
    """Split to read."""
    text_field: str = "text"
    """Column holding the document text (text and chat kinds)."""
    token: str | None = None
    """Access token as an environment reference only, e.g. ``${HF_TOKEN}``."""

    @field_validator("token")
    @classmethod
    def _env_only(cls, value: str | None) -> str | None:
        if value is not None and not ENV_REF.match(value):
            raise ValueError("credentials must be an environment reference like ${HF_TOKEN}, never a literal")
        return value


class FilesSource(_Strict):
    """Local or remote (fsspec URL) files: jsonl, json or parquet."""

    type: Literal["files"]
    """Source kind."""
    paths: list[str] = Field(min_length=1)
    """Paths or glob patterns; relative paths resolve against the data root."""
    format: Literal["jsonl", "json", "parquet"] = "jsonl"
    """File format."""
    text_field: str = "text"
    """Field holding the document text."""


class RemoteFilesSource(_Strict):
    """Published files fetched over HTTP(S) (RedPajama v1's jsonl files): a URL list, one build unit per
    file, downloaded into the data root's cache with resume, retries and the publisher's sha256."""

    type: Literal["remote_files"]
    """Source kind."""
    listing: str | None = None
    """URL (or data-root-relative path) of a text file with one URL a line (``#`` starts a comment),
    e.g. RedPajama's ``urls.txt``; relative lines resolve against the list's URL."""
    urls: list[str] = Field(default_factory=list)
    """The URLs written inline (instead of ``listing``)."""
    include: str | None = None
    """Regular expression: only URLs it finds a match in (one subset of a shared list, e.g. ``/arxiv/``)."""
    checksum: Literal["auto", "required", "none"] = "auto"
    """The publisher's sha256 from ``<url>.sha256``: ``auto`` checks it when the file exists,
    ``required`` fails a file without one, ``none`` never looks."""
    format: Literal["jsonl"] = "jsonl"
    """Record format; ``.gz`` and ``.zst`` files are decompressed while streaming."""
    text_field: str = "text"
    """Field holding the document text."""
    retries: int = Field(default=5, ge=0, le=20)
    """Retries per file after a dropped connection or a 5xx answer (exponential backoff from 0.5 s)."""

    @model_validator(mode="after")
    def _one_list(self) -> RemoteFilesSource:
        if (self.listing is None) == (not self.urls):
            raise ValueError("give exactly one of listing (a urls.txt) or urls (inline)")
        if self.include is not None:
            try:
                re.compile(self.include)
            except re.error as err:
                raise ValueError(f"include is not a valid regular expression ({err})") from None
        return self


class LocalServer(_Strict):
    """Serve a folder on 127.0.0.1 during the download (tiny profile); URLs use ``{LOCAL_SERVER}``."""

    root: str
    """Folder to serve, relative to the data root."""


class UrlListSource(_Strict):
    """An image URL list with captions (CC3M style), downloaded with img2dataset."""

    type: Literal["url_list"]
    """Source kind."""
    path: str
    """TSV, CSV or parquet file of URLs and captions; relative paths resolve against the data root."""
    url_col: str = "url"
    """Column with the image URL."""
    caption_col: str = "caption"
    """Column with the caption."""
    local_server: LocalServer | None = None
    """Optional loopback server for URLs containing ``{LOCAL_SERVER}``."""


class LlavaSource(_Strict):
    """LLaVA-style conversation json (list of ``{id, image?, conversations}``) plus an image root."""

    type: Literal["llava_json"]
    """Source kind."""
    path: str
    """The json file; relative paths resolve against the data root."""
    image_root: str | None = None
    """Folder that ``image`` fields are relative to (required for ``instruct``)."""


Source = Annotated[
    HFSource | FilesSource | RemoteFilesSource | UrlListSource | LlavaSource, Field(discriminator="type")
]


class Subset(_Strict):
    """One part of a dataset with its sampling weight (RedPajama: arxiv, book, c4, ...)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    """Subset name (lowercase, digits, ``_.-``)."""
    weight: float = Field(default=1.0, gt=0)
    """Sampling weight; weights are normalised to sum to 1 in the build."""
    source: Source
    """Where this subset's samples come from."""


class DatasetSpec(_Strict):
    """A dataset: what to read, how to filter it, how to shard it."""

    schema_version: Literal[1] = 1
    """Version of this schema."""
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    """Unique dataset name (used on the command line and in recipes)."""
    kind: Literal["text", "image_text", "instruct", "chat"]
    """``text``: packed token sequences; ``image_text``: image + caption; ``instruct``: image + conversation;
    ``chat``: text-only conversation."""
    profile: Literal["real", "tiny"] = "real"
    """``real`` points at the published sources; ``tiny`` at sample data from ``mvlm data make-samples``."""
    description: str = ""
    """Free text for people."""
    license: str
    """License of the data (SPDX id or the source's own terms)."""
    subsets: list[Subset] = Field(min_length=1)
    """Parts of the dataset with their weights."""
    filters: Filters = Filters()
    """Sample filters."""
    dedup: Dedup = Dedup()
    """De-duplication."""
    tokenizer: str | None = None
    """Tokenizer hub id, or a folder relative to the data root (required for ``text``)."""
    seq_len: int | None = Field(default=None, gt=0)
    """Packed sequence length in tokens (required for ``text``; 2048 for the real profile)."""
    image_size: int | None = Field(default=None, gt=0)
    """Target image side in pixels for image kinds (336 for CLIP ViT-L/14-336)."""
    resize_mode: Literal["keep_ratio", "center_crop", "border", "no"] = "keep_ratio"
    """img2dataset resize mode; ``keep_ratio`` keeps the whole image (padding happens at train time)."""
    shard_samples: int = Field(default=10_000, gt=0)
    """Target samples per shard."""
    heldout_fraction: float = Field(default=0.0, ge=0.0, le=0.5)
    """Fraction of samples (by stable hash) kept out of training for evaluation."""
    max_failure_ratio: float = Field(default=0.05, ge=0.0, le=1.0)
    """The build fails when rejected / read exceeds this ratio."""
    decontaminate: Decontaminate | None = None
    """Reject training samples that show an eval image or contain an eval question (report:
    ``contamination.json``)."""
    downloads: list[Download] = Field(default_factory=list)
    """Files fetched (and unpacked) under the data root before the build, through the same fetcher as
    ``remote_files`` sources; done once, verified by a marker, redone when the URL or checksum changes."""
    allow_hosts: list[str] = Field(default_factory=list)
    """Hosts or networks (CIDR) that URL lists may reach besides public addresses (tiny: 127.0.0.1)."""

    @model_validator(mode="after")
    def _kind_requirements(self) -> DatasetSpec:
        needs = {"text": ("tokenizer", "seq_len"), "image_text": ("image_size",), "instruct": ("image_size",)}
        missing = [f for f in needs.get(self.kind, ()) if getattr(self, f) is None]
        if missing:
            raise ValueError(f"kind {self.kind!r} requires field(s) {missing}")
        allowed = {
            "text": ("hf", "files", "remote_files"),
            "chat": ("llava_json",),
            "image_text": ("url_list", "llava_json"),
            "instruct": ("llava_json",),
        }[self.kind]
        for sub in self.subsets:
            if sub.source.type not in allowed:
                raise ValueError(
                    f"subset {sub.name!r}: source type {sub.source.type!r} not allowed for kind "
                    f"{self.kind!r}; allowed: {list(allowed)}"
                )
        names = [s.name for s in self.subsets]
        if len(set(names)) != len(names):
            raise ValueError(f"subset names must be unique, got {names}")
        if self.dedup.image is not None and self.kind != "image_text":
            raise ValueError(
                f"dedup.image is for image_text specs; kind {self.kind!r} keeps every conversation of a "
                "shared image (use decontaminate to keep eval images out)"
            )
        if self.dedup.minhash is not None and self.kind != "text":
            raise ValueError(
                f"dedup.minhash is for text specs; kind {self.kind!r} has no documents to shingle"
            )
        return self

    def weights(self) -> dict[str, float]:
        """Subset weights normalised to sum to 1."""
        total = sum(s.weight for s in self.subsets)
        return {s.name: s.weight / total for s in self.subsets}


class SpecError(ValueError):
    """One or more problems in spec files, each naming file, line and field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- loading with line numbers ---------------------------------------------------------------------


def _parse_yaml(text: str, file: str) -> tuple[Any, dict]:
    try:
        return parse_yaml(text, file)
    except ValueError as err:
        raise SpecError([str(err)]) from None


def _without_tags(loc: tuple) -> tuple:
    """Drop pydantic's discriminator tags (``source.files.x`` -> ``source.x``)."""
    return tuple(p for i, p in enumerate(loc) if not (i and loc[i - 1] == "source" and p in _SOURCE_MODELS))


def _model_at(loc: tuple, data: Any) -> type[BaseModel] | None:
    """The schema model at a location (for listing allowed keys); sources by their ``type``."""
    model: type[BaseModel] | None = DatasetSpec
    node = data
    for part in loc:
        node = node[part] if isinstance(node, dict | list) and has(node, part) else None
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        if part == "source":
            model = _SOURCE_MODELS.get(node.get("type")) if isinstance(node, dict) else None
            continue
        model = inner_model(model.model_fields[part].annotation)
    return model


_SOURCE_MODELS = {
    "hf": HFSource,
    "files": FilesSource,
    "remote_files": RemoteFilesSource,
    "url_list": UrlListSource,
    "llava_json": LlavaSource,
}


def parse_spec(text: str, file: str = "<spec>") -> DatasetSpec:
    """Validate YAML text as a DatasetSpec; errors list ``file:line: field.path: message``."""
    data, line_map = _parse_yaml(text, file)
    if not isinstance(data, dict):
        raise SpecError([f"{file}:1: a spec must be a mapping of fields, got {type(data).__name__}"])
    try:
        return DatasetSpec.model_validate(data)
    except ValidationError as err:
        model_at = lambda loc: _model_at(loc, data)  # noqa: E731
        raise SpecError(problems_of(err, file, data, line_map, model_at, _without_tags, "(spec)")) from None


def load_spec(path: str | Path) -> DatasetSpec:
    """Read and validate one spec file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError([f"{path}: cannot read spec ({err})"]) from err
    spec = parse_spec(text, str(path))
    if path.stem != spec.name:
        raise SpecError([f"{path}:1: name: spec name {spec.name!r} must equal the file name {path.stem!r}"])
    return spec


def spec_files(spec_dir: str | Path | None = None) -> list[Path]:
    """Every ``*.yaml`` spec in the folder, sorted."""
    folder = Path(spec_dir or os.environ.get("MVLM_SPEC_DIR") or SPEC_DIR)
    return sorted(folder.glob("*.yaml"))


def load_all(spec_dir: str | Path | None = None) -> dict[str, tuple[Path, DatasetSpec]]:
    """All specs by name; raises SpecError listing every problem in every file."""
    specs: dict[str, tuple[Path, DatasetSpec]] = {}
    problems: list[str] = []
    for file in spec_files(spec_dir):
        try:
            spec = load_spec(file)
        except SpecError as err:
            problems.extend(err.problems)
            continue
        specs[spec.name] = (file, spec)
    if problems:
        raise SpecError(problems)
    return specs


def find_spec(name: str, spec_dir: str | Path | None = None) -> tuple[Path, DatasetSpec]:
    """The spec called ``name``; KeyError lists the known names."""
    specs = load_all(spec_dir)
    if name not in specs:
        raise KeyError(f"no dataset spec named {name!r}; known: {', '.join(sorted(specs)) or '(none)'}")
    return specs[name]


def resolve_env(value: str | None) -> str | None:
    """Resolve an environment reference at use time (never store the result)."""
    if value is None:
        return None
    match = ENV_REF.match(value)
    if not match:
        return value
    if match.group(1) not in os.environ:
        raise KeyError(
            f"environment variable {match.group(1)} is not set in process {os.getpid()} on "
            f"{socket.gethostname()} (referenced as {value}); every process that reads the source "
            "needs it: on a Ray cluster set it on each node (or in the worker image), not only where "
            "you start the run"
        )
    return os.environ[match.group(1)]
