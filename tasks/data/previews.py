"""Preview artifacts written next to a build (later logged to MLflow)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def token_chart(manifest: dict[str, Any], out: Path) -> Path:
    """Bar chart of tokens (or samples) per source with the spec's mixture weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subsets = manifest["stats"]["subsets"]
    names = list(subsets)
    measure = "tokens" if manifest["kind"] == "text" else "kept"
    values = [subsets[n].get(measure, 0) for n in names]
    weights = [manifest["weights"].get(n, 0) for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(names)), 3.2), dpi=100)
    ax.bar(names, values, color="#4c72b0")
    for i, (v, w) in enumerate(zip(values, weights, strict=True)):
        ax.annotate(f"w={w:.3f}", (i, v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(measure)
    ax.set_title(f"{manifest['name']} ({manifest['build_id']}): {measure} per source")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()

    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.png")  # two processes may draw it at once
    fig.savefig(tmp, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(out)
    return out
