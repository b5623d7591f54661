"""Hugging Face hub sources pinned to a commit: the revision a spec names is resolved at plan time.

A spec says ``revision: main``; a weekly retrain must notice when ``main`` moves, and a rebuild after
a lost cache must read the same data under the same build id. So ``hub_fingerprint`` asks the hub
(``HfApi.dataset_info``) which commit the revision is now; that sha is part of the build identity and
of the manifest (lineage), and the builder reads the dataset at that sha. A hub dataset that is only
a loading script (``<name>.py``, which ``datasets`` >= 4 refuses to run) fails here, at plan time,
naming the plain-file source to use. A local folder (``dataset: /path``) is read as it is.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tasks.data.builder import BuildError
from tasks.data.specs import DatasetSpec, HFSource, resolve_env

log = logging.getLogger(__name__)


def is_local(src: HFSource) -> bool:
    """True when ``dataset`` is a folder on this machine rather than a hub id."""
    return os.path.isabs(src.dataset) or os.path.isdir(src.dataset)


def hub_fingerprint(spec: DatasetSpec, src: HFSource) -> dict[str, Any]:
    """``{dataset, revision, config[, sha]}``: ``sha`` is the commit ``revision`` names on the hub now."""
    out: dict[str, Any] = {"dataset": src.dataset, "revision": src.revision, "config": src.config}
    if is_local(src):
        return out
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().dataset_info(src.dataset, revision=src.revision, token=resolve_env(src.token))
    except RevisionNotFoundError as err:
        log.debug("hub: %s", err)
        raise BuildError(
            f"spec {spec.name}: hub dataset {src.dataset} has no revision {src.revision!r}; name a branch, "
            "tag or commit sha that exists"
        ) from None
    except RepositoryNotFoundError as err:
        log.debug("hub: %s", err)
        raise BuildError(
            f"spec {spec.name}: hub dataset {src.dataset} not found (or private: set the token the spec "
            f"references, {src.token or 'token: ${HF_TOKEN}'})"
        ) from None
    except (HfHubHTTPError, OSError) as err:
        log.info("hub: %s", err)
        raise BuildError(
            f"spec {spec.name}: cannot ask the hub which commit {src.dataset}@{src.revision} is "
            f"({type(err).__name__}); check the network or HF_ENDPOINT, then rerun"
        ) from None
    files = [s.rfilename for s in info.siblings or []]
    script = f"{src.dataset.rsplit('/', 1)[-1]}.py"
    if script in files:
        raise BuildError(
            f"spec {spec.name}: hub dataset {src.dataset} is a loading-script dataset ({script}), which "
            "`datasets` >= 4 no longer runs. Read its published files instead: a `remote_files` source "
            "listing the file URLs (data_specs/redpajama-v1.yaml does this for RedPajama v1), or the "
            "hub's parquet conversion with `revision: refs/convert/parquet` when it has one"
        )
    out["sha"] = info.sha
    return out


def read_revision(source: dict[str, Any] | None, src: HFSource) -> str | None:
    """The revision to read: the commit resolved at plan time, else the spec's own (local folders)."""
    return (source or {}).get("sha") or src.revision
