"""DeepSpeed training checkpoints (``step-N`` folders and ``latest``): checked before a resume, loaded
without unpickling.

``repair_checkpoints`` runs once, in the driver, before any worker starts. It checks the newest
``step-N`` folder without unpickling anything: every file DeepSpeed writes for a tag of this world
size and ZeRO stage must be there, and every file must be a complete torch zip whose members pass
their CRC-32 (``zipfile.ZipFile.testzip``). A bad folder is moved aside to
``corrupt-step-N-<time>`` (the name does not match ``step-*``, so pruning and resuming ignore it)
and the next older one is checked; ``latest`` is then rewritten atomically to the newest good tag
(or removed when none is good, so the stage starts from scratch). Each repair is a WARNING.

``safe_load_engine`` swaps DeepSpeed's ``TorchCheckpointEngine`` (whose ``load`` calls
``torch.load(weights_only=False)``) for one that loads with ``weights_only=True``; the only
non-tensor classes allowed are the four plain data classes DeepSpeed itself stores in ZeRO
optimizer states. A file that needs anything else raises ``UnsafeCheckpointError``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import re
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TAG = re.compile(r"step-(\d+)")
LATEST = "latest"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds pickled objects beyond tensors and plain data; it is not loaded."""


@dataclass(frozen=True)
class CheckpointLayout:
    """What DeepSpeed writes per tag for a run (model parallel size 1, no pipeline, no MoE)."""

    world_size: int
    """Data-parallel ranks (Ray Train workers)."""
    zero_stage: int
    """ZeRO stage (0-3)."""
    bf16: bool = False
    """bf16 training (DeepSpeed's bf16 optimizer writes per-rank optimizer files even at stage 0)."""

    def expected(self) -> list[tuple[str, ...]]:
        """For each file DeepSpeed writes, the names it may have (optimizer files carry ``bf16_`` or not)."""
        ranks = range(self.world_size)
        if self.zero_stage >= 3:
            files = [(f"zero_pp_rank_{r}_mp_rank_00_model_states.pt",) for r in ranks]
        else:
            files = [("mp_rank_00_model_states.pt",)]
        if self.zero_stage > 0 or self.bf16:
            names = (
                "zero_pp_rank_{}_mp_rank_00_optim_states.pt",
                "bf16_zero_pp_rank_{}_mp_rank_00_optim_states.pt",
            )
            files += [tuple(n.format(r) for n in names) for r in ranks]
        return files


@dataclass
class CheckpointRepair:
    """What ``repair_checkpoints`` found and did."""

    resume_tag: str | None = None
    """The tag ``latest`` names now (None: no usable checkpoint, the stage starts from scratch)."""
    moved: list[dict[str, str]] = field(default_factory=list)
    """``{"tag", "reason", "moved_to"}`` for each bad folder moved aside."""
    latest_was: str | None = None
    """What ``latest`` held before (None when absent)."""

    @property
    def repaired(self) -> bool:
        """True when something was moved or ``latest`` changed."""
        return bool(self.moved) or self.latest_was != self.resume_tag


def step_tags(ckpt_dir: Path) -> list[Path]:
    """``step-N`` folders, newest first."""
    folders = [p for p in Path(ckpt_dir).glob("step-*") if p.is_dir() and TAG.fullmatch(p.name)]
    return sorted(folders, key=lambda p: int(p.name[5:]), reverse=True)


def zip_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete torch zip archive with intact members, else None (reads it all,
    unpickles nothing)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = archive.namelist()
    except zipfile.BadZipFile as err:
        return f"not a complete zip archive ({err}): truncated or overwritten"
    except Exception as err:  # a garbled directory can fail in many ways (struct, unicode, EOF...)
        return f"unreadable zip archive ({type(err).__name__}: {err})"
    if bad is not None:
        return f"member {bad} fails its CRC check: bytes changed after writing"
    if not any(n.endswith("data.pkl") for n in names):
        return "zip archive without data.pkl: not a torch checkpoint file"
    import torch

    try:  # torch's own zip reader (miniz) is stricter about the zip64 records; it reads no pickle
        torch._C.PyTorchFileReader(str(path))
    except Exception as err:
        return f"torch cannot open it ({str(err).strip().splitlines()[0]})"
    return None


def tag_problem(folder: Path, layout: CheckpointLayout) -> str | None:
    """Why the checkpoint folder cannot be resumed from, else None."""
    if not folder.is_dir():
        return "folder missing"
    present = []
    for names in layout.expected():
        found = next((folder / n for n in names if (folder / n).is_file()), None)
        if found is None:
            return f"{names[0]} is missing (world size {layout.world_size}, ZeRO {layout.zero_stage})"
        present.append(found)
    with ThreadPoolExecutor(max_workers=min(8, len(present))) as pool:  # zlib.crc32 releases the GIL
        problems = list(pool.map(zip_problem, present))
    for path, problem in zip(present, problems, strict=True):
        if problem:
            return f"{path.name}: {problem}"
    return None


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag in ``latest`` (empty string for an empty file), or None when there is no file."""
    path = Path(ckpt_dir) / LATEST
    try:
        return path.read_text(errors="replace").strip()
    except FileNotFoundError:
        return None


def write_latest(ckpt_dir: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` atomically (temp file, fsync, rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{LATEST}.", suffix=".tmp", dir=ckpt_dir)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(tag)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, Path(ckpt_dir) / LATEST)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def repair_checkpoints(ckpt_dir: str | Path, layout: CheckpointLayout) -> CheckpointRepair:
    """Make ``latest`` name the newest usable checkpoint, moving unusable newer ones aside.

    Call this once, before the ranks start (it renames folders). Folders older than the newest good
    one are not read. With no usable checkpoint ``latest`` is removed and the stage starts over.
    """
    ckpt_dir = Path(ckpt_dir)
    report = CheckpointRepair(latest_was=read_latest(ckpt_dir))
    if not ckpt_dir.is_dir():
        return report
    for folder in step_tags(ckpt_dir):
        problem = tag_problem(folder, layout)
        if problem is None:
            report.resume_tag = folder.name
            break
        moved_to = ckpt_dir / f"corrupt-{folder.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        os.replace(folder, moved_to)
        report.moved.append({"tag": folder.name, "reason": problem, "moved_to": moved_to.name})
        log.warning("checkpoint %s is unusable (%s); moved aside to %s", folder, problem, moved_to.name)
    latest = report.latest_was
    if report.resume_tag is None:
        if latest is not None:
            (ckpt_dir / LATEST).unlink(missing_ok=True)
        if latest is not None or report.moved:
            log.warning("no usable checkpoint in %s; the stage starts from scratch", ckpt_dir)
        return report
    if latest != report.resume_tag:
        if latest is None:
            why = "latest is missing"
        elif not latest:
            why = "latest is empty"
        elif not (ckpt_dir / latest).is_dir():
            why = f"latest named {latest!r}, which is not there"
        else:
            why = f"latest named {latest!r} but {report.resume_tag} is newer and complete"
        write_latest(ckpt_dir, report.resume_tag)
        log.warning("checkpoints %s: %s; latest now names %s", ckpt_dir, why, report.resume_tag)
    return report


# --- loading without pickle ----------------------------------------------------------------------


def deepspeed_safe_globals() -> list[Any]:
    """The plain data classes DeepSpeed pickles into ZeRO optimizer states (no code runs when they load)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` allowing only ``deepspeed_safe_globals``; refusals raise
    UnsafeCheckpointError naming the file and the offending global."""
    import torch

    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"global {found.group(1)}" if found else "objects"
        # short and unchained: Ray Train shows only the last 500 characters of a worker's traceback
        raise UnsafeCheckpointError(
            f"refused to load checkpoint file {path}: it pickles {what}, not just tensors and plain data "
            "(resuming never unpickles code; delete that checkpoint folder to resume from the one before)"
        ) from None


@functools.cache
def _safe_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine whose ``load`` never unpickles code."""

        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_torch_load(path, map_location)

    return SafeTorchCheckpointEngine


def safe_load_engine(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read every file with ``weights_only=True``.

    DeepSpeed reads model and ZeRO states through ``engine.checkpoint_engine.load``; its default
    TorchCheckpointEngine passes ``weights_only=False``. The swap keeps the engine's settings (only
    the class changes), so saving is unaffected.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    safe = _safe_engine_class()
    if isinstance(current, safe):
        return
    if type(current) is not TorchCheckpointEngine:
        raise UnsafeCheckpointError(
            f"cannot resume safely with DeepSpeed checkpoint engine {type(current).__name__}: only the "
            "default torch engine is wrapped to load with weights_only=True"
        )
    current.__class__ = safe
