"""Images/s of the image-text build on local files, and the same decode+resize+encode in a bare loop.

Ours: ``build_dataset`` of an image_text spec over a LLaVA-style json of N generated JPEGs on local
disk (Ray fan-out, checks, resize, JPEG encode, shard writing, manifest). Reference: a single-process
PIL loop doing only decode -> RGB -> resize -> JPEG encode of the same files. Printed last: the
ratio of images/s per core (ours/reference); before it, the same with near-identical image search on
(``dedup.image``: a perceptual hash of every image and the partitioned reduce) as a second ratio.

    python benchmarks/image_shards.py [--images 2000] [--size 256] [--image-size 224]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MVLM_NO_PROGRESS", "1")

SPEC = """\
name: {name}
kind: image_text
license: CC0-1.0
image_size: {image_size}
shard_samples: 500
heldout_fraction: 0.01
max_failure_ratio: 0.01
{dedup}
subsets:
  - {{name: bench, source: {{type: llava_json, path: src/images.json, image_root: src/images}}}}
"""


def make_images(root: Path, count: int, size: int) -> list[Path]:
    """Random-content JPEGs of varied aspect ratios plus the LLaVA-style json describing them."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    folder = root / "src" / "images"
    folder.mkdir(parents=True)
    records, paths = [], []
    for i in range(count):
        w, h = size, int(size * rng.uniform(0.6, 1.6))
        img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            xs, ys = sorted(rng.sample(range(w), 2)), sorted(rng.sample(range(h), 2))
            draw.ellipse([xs[0], ys[0], xs[1], ys[1]], fill=tuple(rng.randrange(256) for _ in range(3)))
        path = folder / f"{i:06d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
        turns = [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"pic {i}"},
        ]
        records.append({"id": f"{i:06d}", "image": path.name, "conversations": turns})
    (root / "src" / "images.json").write_text(json.dumps(records))
    return paths


def timed(fn) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def reference(paths: list[Path], image_size: int) -> float:
    """Seconds for decode -> RGB -> resize (shorter side) -> JPEG encode of every file, one process."""
    from PIL import Image

    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            scale = image_size / min(rgb.size)
            rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.BICUBIC)
            rgb.save(io.BytesIO(), format="JPEG", quality=95)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray

    from tasks.core.parallel import ensure_ray
    from tasks.data.build import build_dataset

    root = Path(tempfile.mkdtemp(prefix="mvlm-img-bench-"))
    paths = make_images(root, args.images, args.size)
    spec = root / "bench-images.yaml"
    spec.write_text(SPEC.format(name="bench-images", image_size=args.image_size, dedup=""))
    hashed = root / "bench-images-phash.yaml"
    hashed.write_text(
        SPEC.format(
            name="bench-images-phash", image_size=args.image_size, dedup="dedup: {image: {max_distance: 16}}"
        )
    )
    ensure_ray()
    cores = int(ray.cluster_resources().get("CPU", 1))
    build_dataset(spec, root, force=True)  # warm-up: Ray workers and imports
    ours = statistics.median(
        timed(lambda: build_dataset(spec, root, force=True)) for _ in range(args.repeats)
    )
    build_dataset(hashed, root, force=True)
    near = statistics.median(
        timed(lambda: build_dataset(hashed, root, force=True)) for _ in range(args.repeats)
    )
    ref = statistics.median(reference(paths, args.image_size) for _ in range(args.repeats))
    ours_rate, ref_rate = args.images / ours, args.images / ref
    print(f"{args.images} JPEGs ({args.size}px) -> shards at {args.image_size}px, median of {args.repeats}")
    per_core = ours_rate / cores
    print(
        f"ours      build_dataset ({cores} Ray CPUs) {ours:7.2f} s {ours_rate:8.1f} img/s "
        f"{per_core:8.1f}/core"
    )
    print(f"reference PIL loop (1 process)        {ref:7.2f} s {ref_rate:8.1f} img/s {ref_rate:8.1f}/core")
    print(
        f"ours+phash build_dataset, dedup.image   {near:7.2f} s {args.images / near:8.1f} img/s "
        f"{args.images / near / cores:8.1f}/core"
    )
    print(f"ratio ours+phash/reference images/s per core: {args.images / near / cores / ref_rate:.3f}")
    print(f"ratio ours/reference images/s per core: {ours_rate / cores / ref_rate:.3f}")


if __name__ == "__main__":
    main()
