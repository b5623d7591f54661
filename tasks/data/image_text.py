"""Image-text builds: URL lists through img2dataset (``url_list``), LLaVA pretrain json from local
images (``llava_json``); what every unit shares is in ``image_units``.

With ``dedup.image`` every unit's usable images are hashed first (one Ray task per unit) and the
near-identical ones found across the whole build before any unit is written; then the second pass
writes every unit. ``preview.png`` shows up to 16 train samples.
"""

from __future__ import annotations

import logging
from typing import Any

from tasks.data.builder import (
    BuildContext,
    FanOut,
    UnitResult,
    finished_unit,
    save_unit,
)
from tasks.data.dedup import (
    run_reduce,
)
from tasks.data.image_units import image_dedup_plan, write_preview
from tasks.data.llava_images import LlavaJob, plan_llava_subset, process_llava, scan_llava
from tasks.data.specs import UrlListSource
from tasks.data.url_list import (
    UrlShardJob,
    download_subset,
    plan_url_subset,
    process_url_shard,
    scan_url_shard,
)

log = logging.getLogger(__name__)


# --- the build -----------------------------------------------------------------------------------


def process_job(job: UrlShardJob | LlavaJob, ctx: BuildContext) -> UnitResult:
    """Ray task body: one unit of the second pass."""
    if isinstance(job, UrlShardJob):
        return process_url_shard(job, ctx)
    return process_llava(job, ctx)


def scan_job(job: UrlShardJob | LlavaJob, ctx: BuildContext) -> dict[str, Any]:
    """Ray task body: the perceptual hashes of one unit (``dedup.image``)."""
    if isinstance(job, UrlShardJob):
        return scan_url_shard(job, ctx)
    return scan_llava(job, ctx)


def build_image_text(ctx: BuildContext, fan_out: FanOut) -> list[UnitResult]:
    """Every unit of an image-text spec (finished units are reused), then the preview."""
    done: list[UnitResult] = []
    jobs: list[UrlShardJob | LlavaJob] = []
    every: list[UrlShardJob | LlavaJob] = []  # near-identical images are searched across the whole build
    next_index = 0
    for sub in ctx.spec.subsets:
        if isinstance(sub.source, UrlListSource):
            plan = plan_url_subset(ctx, sub, next_index)
            next_index += 1 + len(plan.units)
            done.append(finished_unit(ctx, plan.list_unit.index) or save_unit(ctx, plan.list_result))
            pending = []
            for k, unit in enumerate(plan.units):
                if (result := finished_unit(ctx, unit.index)) is not None:
                    done.append(result)
                else:
                    pending.append(k)
            if pending:
                download_subset(ctx, plan, pending)
            raw = str(ctx.out / plan.work / "img2dataset")
            size = ctx.spec.shard_samples
            units = [
                UrlShardJob(unit, raw, k, len(plan.rows[k * size : (k + 1) * size]))
                for k, unit in enumerate(plan.units)
            ]
            every += units
            jobs += [units[k] for k in pending]
        else:
            chunks = plan_llava_subset(ctx, sub, next_index)
            every += chunks
            next_index += len(chunks)
            for job in chunks:
                if (result := finished_unit(ctx, job.unit.index)) is not None:
                    done.append(result)
                else:
                    jobs.append(job)
    if jobs:
        log.debug("%s: %d units to write (%d reused)", ctx.spec.name, len(jobs), len(done))
    if (plan := image_dedup_plan(ctx)) is not None and jobs:
        scans = fan_out(scan_job, every, ctx, label=f"{ctx.spec.name}: image hashes")
        run_reduce(plan, scans, fan_out, ctx.spec.name)
    results = fan_out(process_job, jobs, ctx, label=f"{ctx.spec.name}: filter+shard")
    merged = sorted([*done, *results], key=lambda r: r.index)
    write_preview(ctx, merged)
    return merged
