"""Reports: bench result rows (ours and the paper's device results) grouped, and a chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The paper's device results (MobileVLM, arXiv 2312.16886, Tables 5-6; 4-bit = q4_k_s through llama.cpp).
PAPER_RESULTS: list[dict[str, Any]] = [
    {"device": "snapdragon-888", "quant_type": "q4_k_s", "model": "MobileVLM-1.7B",
     "vlm.eval_tps": 21.54, "vlm.total_s": 18.51, "vlm.prompt_tps": 34.93},
    {"device": "snapdragon-888", "quant_type": "q4_k_s", "model": "MobileVLM-3B",
     "vlm.eval_tps": 12.21, "vlm.total_s": 33.10},
    {"device": "snapdragon-888", "quant_type": "q4_k_s", "model": "MobileLLaMA-1.4B", "lm.eval_tps": 28.32},
    {"device": "snapdragon-888", "quant_type": "q4_k_s", "model": "MobileLLaMA-2.7B", "lm.eval_tps": 14.71},
    {"device": "jetson-orin", "quant_type": "q4_k_s", "model": "MobileVLM-1.7B",
     "vlm.eval_tps": 65.27, "vlm.total_s": 5.14, "vlm.prompt_tps": 667.69},
    {"device": "jetson-orin", "quant_type": "q4_k_s", "model": "MobileVLM-3B", "vlm.eval_tps": 38.34,
     "vlm.total_s": 8.31},
]  # fmt: skip
REPORT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("lm.eval_tps", "LM eval tok/s"),
    ("lm.prompt_tps", "LM prompt tok/s"),
    ("lm.total_s", "LM total s"),
    ("vlm.prompt_tps", "VLM prompt tok/s"),
    ("vlm.eval_tps", "VLM eval tok/s"),
    ("vlm.total_s", "VLM total s"),
    ("vlm.vision_encode_ms", "vision ms"),
    ("pp512.mean_tps", "pp512 tok/s"),
    ("tg128.mean_tps", "tg128 tok/s"),
    ("peak_rss_mb", "peak RSS MB"),
    ("model_size_gb", "size GB"),
)


def report_groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows grouped by (device, quant type): ours first, the paper's beside them."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: (r["device"], r["quant_type"], r["source"] != "ours", r["model"])):
        groups.setdefault((row["device"], row["quant_type"]), []).append(row)
    return groups


def write_chart(rows: list[dict[str, Any]], path: str | Path, metric: str = "lm.eval_tps") -> Path:
    """Bar chart of ``metric`` (default: generation tok/s) for every row that has it, ours and paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if metric in r] + [r for r in rows if metric not in r and "vlm.eval_tps" in r]
    labels = [f"{r['device']}\n{r['model']}\n{r['quant_type']} ({r['source']})" for r in chosen]
    values = [float(r.get(metric, r.get("vlm.eval_tps", 0.0))) for r in chosen]
    colours = ["tab:blue" if r["source"] == "ours" else "tab:gray" for r in chosen]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(chosen)), 4.5))
    ax.bar(range(len(chosen)), values, color=colours)
    ax.set_xticks(range(len(chosen)), labels, fontsize=7)
    ax.set_ylabel("generation tokens/s (log)")
    ax.set_yscale("log")
    ax.set_title("MobileVLM device benchmarks: ours (blue) and the paper's (grey)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
