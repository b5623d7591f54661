"""Shared pytest fixtures."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from model.conversation import VICUNA_SYSTEM
from model.tokenizer import train_tokenizer

TINY_VOCAB_SIZE = 512

_SUBJECTS = ("A red fox", "The small dog", "A white cat", "Two people", "An old car", "A green bird")
_PLACES = ("in the snow", "on the grass", "near a river", "under a tree", "on a busy street", "in a kitchen")
_QUESTIONS = (
    "What is in the picture?",
    "What color is it?",
    "Where is it?",
    "Describe the image in detail.",
    "How many animals are there?",
)


def build_tiny_corpus() -> list[str]:
    """A small deterministic English corpus with captions and Vicuna-style chat turns."""
    captions = [f"{s} {p}." for s, p in itertools.product(_SUBJECTS, _PLACES)]
    chats = [
        f"{VICUNA_SYSTEM} USER: {q} ASSISTANT: It is {c[0].lower()}{c[1:]}</s>"
        for q, c in zip(itertools.cycle(_QUESTIONS), captions, strict=False)
    ]
    return captions + chats


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that register new versions in the session's tiny retrain store run after every test that
    reads that store (which expects the retrain's versions to be the latest), whatever the order asked."""
    items.sort(key=lambda item: item.get_closest_marker("mutates_session_retrain") is not None)


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    """The corpus the ``tiny_tokenizer`` fixture is trained on (a fresh list per session)."""
    return build_tiny_corpus()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus: list[str]) -> PreTrainedTokenizerFast:
    """A LLaMA-style BPE tokenizer (vocab 512, byte fallback) trained on ``tiny_corpus``."""
    return train_tokenizer(tiny_corpus, vocab_size=TINY_VOCAB_SIZE)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (started on first use, shut down at the end)."""
    import os

    import ray

    from tasks.core.parallel import ensure_ray

    os.environ.setdefault("MVLM_NO_PROGRESS", "1")
    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_api():
    """A real, temporary Prefect API (prefect_test_harness) shared by the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def samples_root(tmp_path_factory) -> Path:
    """A data root holding ``samples/`` from ``make_samples`` (default config), shared by the session."""

    from tasks.testkit.sample_tree import make_samples

    root = Path(tmp_path_factory.mktemp("data_root"))
    make_samples(root / "samples")
    return root


@pytest.fixture(scope="session")
def tiny_retrain(samples_root: Path, tmp_path_factory, ray_local, prefect_api) -> tuple[Path, dict]:
    """(work dir, result) of one uninterrupted ``retrain("tiny")`` in this process (SQLite MLflow
    under the work dir), shared by the pipeline tests and the chaos test that compares with it.
    MVLM_WORK_DIR is set only while it runs: tests that read its store set it themselves."""
    from flows.retrain import retrain

    work = tmp_path_factory.mktemp("pipeline")
    (work / "data").mkdir()
    (work / "data" / "samples").symlink_to(samples_root / "samples")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MVLM_WORK_DIR", str(work))
        return work, retrain("tiny")


@pytest.fixture(scope="module")
def env(tiny_retrain: tuple[Path, dict]):
    """The session's tiny retrain work dir; MVLM_WORK_DIR points at it for the module that asks."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MVLM_WORK_DIR", str(tiny_retrain[0]))
        yield tiny_retrain[0]


@pytest.fixture(scope="module")
def retrained(env: Path, tiny_retrain: tuple[Path, dict]) -> dict:
    """The summary of the session's tiny retrain."""
    return tiny_retrain[1]


@pytest.fixture(scope="module")
def mlflow(retrained: dict):
    """An MLflow client on the tiny retrain's store."""
    from tasks.lineage import tracking

    return tracking.client()


@pytest.fixture(scope="session")
def eval_replicas(tmp_path_factory) -> Path:
    """A data root holding only ``samples/eval/``: the six benchmark replicas (default config)."""
    from tasks.testkit.eval_samples import make_eval_sets
    from tasks.testkit.samples import SampleConfig

    root = Path(tmp_path_factory.mktemp("eval_root"))
    for relative, data in make_eval_sets(SampleConfig()).items():
        path = root / "samples" / "eval" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root
