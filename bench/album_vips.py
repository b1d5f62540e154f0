"""The album bench's side that runs in the image_tools module's venv (it has pyvips).

``python bench/album_vips.py reference JOBS_JSON``
    libvips doing the album's outputs with no queue: ``pyvips.Image.thumbnail`` in 2
    processes (a pool of 2, started and warm before the clock starts). Prints
    ``{"seconds": …}``.
``python bench/album_vips.py engines PHOTO``
    One photo, one process: ms per 256 px and 1280 px output for each candidate engine,
    and each one's mean absolute difference from Pillow's Lanczos of the full decode.
    Prints JSON.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import pyvips
from PIL import Image, ImageChops, ImageStat

#: Runs of each engine per size (the median is reported).
ENGINE_RUNS = 5
#: The album's two outputs: a thumbnail and a preview box, in pixels.
BOXES = (256, 1280)


def thumbnail(job: tuple[str, str, int]) -> None:
    source, target, box = job
    pyvips.Image.thumbnail(source, box, height=box).write_to_file(target, keep="icc")


def reference(jobs_file: str) -> dict[str, float]:
    jobs = [tuple(job) for job in json.loads(Path(jobs_file).read_text())]
    pyvips.cache_set_max(0)
    with Pool(2) as pool:
        pool.map(abs, range(4))  # both processes up and warm before the clock starts
        began = time.perf_counter()
        pool.map(thumbnail, jobs, chunksize=1)
        return {"seconds": time.perf_counter() - began}


def fit(size: tuple[int, int], box: int) -> tuple[int, int]:
    scale = min(box / size[0], box / size[1])
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def pillow(photo: str, box: int, gap: float | None) -> Image.Image:
    """Pillow: JPEG draft to ``gap`` x the target (None: no draft), then Lanczos."""
    with Image.open(photo) as image:
        size = fit(image.size, box)
        if gap is not None:
            image.draft("RGB", (int(size[0] * max(gap, 1.0)), int(size[1] * max(gap, 1.0))))
        return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=gap if gap and gap > 1 else None)


def vips(photo: str, box: int) -> Image.Image:
    thumb = pyvips.Image.thumbnail(photo, box, height=box)
    return Image.frombytes("RGB", (thumb.width, thumb.height), thumb.write_to_memory())


def engines(photo: str) -> dict[str, Any]:
    pyvips.cache_set_max(0)
    candidates: dict[str, Callable[[int], Image.Image]] = {
        "Pillow, full decode + Lanczos": lambda box: pillow(photo, box, None),
        "Pillow, draft to the target + Lanczos": lambda box: pillow(photo, box, 1.0),
        "Pillow, draft + reducing_gap=2 (thumbnail's rule)": lambda box: pillow(photo, box, 2.0),
        "libvips thumbnail (shrink-on-load)": lambda box: vips(photo, box),
    }
    with Image.open(photo) as image:
        full = image.convert("RGB")
    figures: dict[str, Any] = {}
    for box in BOXES:
        lanczos = full.resize(fit(full.size, box), Image.Resampling.LANCZOS)
        bicubic = full.resize(lanczos.size, Image.Resampling.BICUBIC)
        figures[f"bicubic, full decode ({box} px) mad"] = mad(bicubic, lanczos)
        for name, make in candidates.items():
            make(box)
            times = []
            for _ in range(ENGINE_RUNS):
                began = time.perf_counter()
                output = make(box)
                times.append(1000 * (time.perf_counter() - began))
            figures[f"{name} ({box} px)"] = {
                "ms": sorted(times)[ENGINE_RUNS // 2],
                "mad": mad(output, lanczos),
            }
    return figures


def mad(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference per channel, 0..255."""
    return round(sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3, 3)


if __name__ == "__main__":
    command, argument = sys.argv[1], sys.argv[2]
    answer = reference(argument) if command == "reference" else engines(argument)
    print(json.dumps(answer))
