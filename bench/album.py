"""Album import: N photos of 12 MP, each a 256 px thumbnail job and a 1280 px preview job.

``scripts/bench-album.sh [--photos N]`` (or ``python -m bench.album``) measures, in one run:

* **cl_tasks**: the API's rows (era-A ``jobs`` DDL from tests/fixtures/cl_server) inserted into
  ``media_store.db`` one by one as the API does, consumed by ``celery -A cl_tasks worker
  -Q image_resize -c 2``; timed from the first insert to the last ``completed_at``.
* **libvips**: ``pyvips.Image.thumbnail`` writing the same outputs in 2 processes, no
  queue at all (``bench/album_vips.py`` in the module's venv, which has pyvips).
* their ratio (the goal is <= 1.3), best round against best round (the rounds
  alternate, so a busy spell of a shared machine hits both sides);
* the engine figures behind the runner's choice (ms and mean absolute difference
  from Pillow's Lanczos, per candidate), and the runner's peak RSS on a 12 MP and
  a 48 MP photo.

Photos are generated, photo-like (colour regions, shapes, gradients, grain; ~4-5 MB
as JPEG quality 90): a few distinct ones, copied to N files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops, ImageDraw

from bench.harness import ROOT, api_database
from bench.jobs import MODULE, VENVS, _start_worker, insert_api_row
from cl_tasks.modules import read_module, venv_python

#: A 12 MP photo, and a 48 MP one (for the memory figure), in pixels.
PHOTO_12MP = (4000, 3000)
PHOTO_48MP = (8000, 6000)
#: Distinct photos generated (the N files are copies of these).
DISTINCT = 4
#: The album's two jobs per photo: thumbnail and preview boxes, in pixels.
BOXES = {"thumb": 256, "preview": 1280}
#: JPEG quality of the generated photos (a phone's is 85-95).
PHOTO_QUALITY = 90


def _layer(size: tuple[int, int], cell: int, sigma: float) -> Image.Image:
    """Colour noise with features about ``cell`` pixels wide, scaled up smoothly."""
    small = (max(2, size[0] // cell), max(2, size[1] // cell))
    channels = [Image.effect_noise(small, sigma) for _ in range(3)]
    return Image.merge("RGB", channels).resize(size, Image.Resampling.BICUBIC)


def photo_like(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A picture with a photo's statistics: soft regions, hard-edged shapes, texture, grain."""
    rng = random.Random(seed)
    width, height = size
    image = Image.blend(_layer(size, 500, 60), _layer(size, 40, 50), 0.35)
    image = Image.blend(image, Image.linear_gradient("L").resize(size).convert("RGB"), 0.25)
    draw = ImageDraw.Draw(image)
    for _ in range(25):
        x, y, r = rng.randrange(width), rng.randrange(height), rng.randrange(width // 40, width // 6)
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.ellipse((x - r, y - r // 2, x + r, y + r // 2), fill=colour)
        else:
            corners = [(x + rng.randrange(-r, r), y + rng.randrange(-r, r)) for _ in range(5)]
            draw.polygon(corners, fill=colour)
    image = Image.blend(image, _layer(size, 4, 40), 0.2)
    grain = Image.merge("RGB", [Image.effect_noise(size, 10)] * 3)
    return ImageChops.add(image, grain, offset=-128)


def make_album(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    distinct = []
    for seed in range(min(DISTINCT, count)):
        path = folder / f"distinct-{seed}.jpg"
        photo_like(PHOTO_12MP, seed).save(path, quality=PHOTO_QUALITY)
        distinct.append(path)
    photos = []
    for n in range(count):
        path = folder / f"IMG_{n:04d}.jpg"
        shutil.copyfile(distinct[n % len(distinct)], path)
        photos.append(path)
    for path in distinct:
        path.unlink()
    return photos


def wait_completed(database: Path, count: int, timeout: float = 900) -> int:
    """The last ``completed_at`` (ms) once ``count`` jobs ended; raises if one failed."""
    conn = sqlite3.connect(database, timeout=60)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            rows = conn.execute(
                "SELECT status, completed_at, error_message FROM jobs WHERE status IN ('completed', 'error')"
            ).fetchall()
            failed = [row for row in rows if row[0] == "error"]
            if failed:
                raise RuntimeError(f"album job failed: {failed[0][2]}")
            if len(rows) >= count:
                return max(int(row[1]) for row in rows)
            time.sleep(0.01)
    finally:
        conn.close()
    raise RuntimeError(f"the album's {count} jobs did not end within {timeout}s")


def jobs_of(photos: list[Path], out: Path) -> list[tuple[str, str, int]]:
    """(source, target, box) of every job: thumbnail and preview of each photo, in upload order."""
    return [
        (str(photo), str(out / kind / photo.name), box) for photo in photos for kind, box in BOXES.items()
    ]


def resize_params(source: str, target: str, box: int) -> dict[str, Any]:
    """The ``image_resize`` params of one album job: ``source`` fitted inside ``box`` px."""
    return {
        "input_paths": [source],
        "output_paths": [target],
        "width": box,
        "height": box,
        "maintain_aspect_ratio": True,
    }


def measure_cl_tasks(server: Path, photos: list[Path]) -> float:
    database = server / "media_store.db"
    # The worker's log goes too: the previous round's "ready." would let this round start early.
    (server / "worker.log").unlink(missing_ok=True)
    shutil.rmtree(server / "out", ignore_errors=True)
    api_database(database)
    jobs = jobs_of(photos, server / "out")
    worker = _start_worker(server)
    try:
        began = time.time()
        for n, (source, target, box) in enumerate(jobs):
            insert_api_row(database, f"album-{n}", resize_params(source, target, box))
        last = wait_completed(database, len(jobs))
    finally:
        os.killpg(worker.pid, signal.SIGKILL)  # the worker, its pool and their runners
        worker.wait()
    return last / 1000 - began


def measure_vips(python: Path, workdir: Path, photos: list[Path]) -> float:
    out = workdir / "vips"
    shutil.rmtree(out, ignore_errors=True)
    for kind in BOXES:
        (out / kind).mkdir(parents=True)
    jobs_file = workdir / "vips-jobs.json"
    jobs_file.write_text(json.dumps(jobs_of(photos, out)))
    answer = _module_script(python, "reference", str(jobs_file))
    return float(answer["seconds"])


def _module_script(python: Path, command: str, argument: str) -> dict[str, Any]:
    result = subprocess.run(
        [str(python), str(ROOT / "bench" / "album_vips.py"), command, argument],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def memory(python: Path, workdir: Path, photo_12mp: Path) -> dict[str, float]:
    photo_48mp = workdir / "48mp.jpg"
    with Image.open(photo_12mp) as image:
        image.resize(PHOTO_48MP, Image.Resampling.BICUBIC).save(photo_48mp, quality=PHOTO_QUALITY)
    figures = {"runner idle (imports only)": _peak(python, None)}
    for label, photo in (("12 MP", photo_12mp), ("48 MP", photo_48mp)):
        for box in BOXES.values():
            with Image.open(photo) as image:
                # The runner's rule: DCT scaling needs a 4x smaller target, else libvips decodes.
                engine = "Pillow draft" if image.width >= 4 * box else "libvips"
            params = resize_params(str(photo), str(workdir / f"m{box}.jpg"), box)
            figures[f"{label} JPEG -> {box} px JPEG ({engine})"] = _peak(python, ("image_resize", params))
        png = workdir / f"{label[:2]}.png"
        with Image.open(photo) as image:
            image.save(png, compress_level=1)
        params = {
            "input_paths": [str(png)],
            "output_paths": [str(workdir / "m.png.jpg")],
            "width": BOXES["preview"],
            "height": BOXES["preview"],
            "maintain_aspect_ratio": True,
        }
        figures[f"{label} PNG -> 1280 px JPEG (Pillow)"] = _peak(python, ("image_resize", params))
        params = {"input_paths": [str(photo)], "output_paths": [str(workdir / "m.webp")], "format": "webp"}
        figures[f"{label} JPEG -> full-size WebP (Pillow)"] = _peak(python, ("image_conversion", params))
    return figures


def _peak(python: Path, job: tuple[str, dict[str, Any]] | None) -> float:
    """Peak RSS (MiB) of a fresh runner that serves ``job`` (or nothing) and exits."""
    process = subprocess.Popen(
        [str(python), str(MODULE / "runner.py")],
        cwd=MODULE,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    if job is not None:
        spec = {"job_id": "memory", "task_type": job[0], "params": job[1]}
        process.stdin.write(json.dumps(spec) + "\n")
        process.stdin.flush()
        reply = process.stdout.readline()
        while '"event": "progress"' in reply:
            reply = process.stdout.readline()
        if '"event": "result"' not in reply:
            raise RuntimeError(f"memory job failed: {reply}")
    else:
        assert process.stderr is not None
        process.stderr.readline()  # "image_tools runner ready": its imports are done
    # VmHWM of the live runner: its own peak since exec (a child's ru_maxrss would count
    # the bench's memory that the fork copied before exec).
    status = Path(f"/proc/{process.pid}/status").read_text()
    process.stdin.close()
    process.wait(timeout=60)
    peak_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return round(peak_kib / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=24, help="photos in the album (2 jobs each)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated runs of each; the best counts")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS figures")
    args = parser.parse_args()
    python = venv_python(VENVS, read_module(MODULE))
    workdir = Path(tempfile.mkdtemp(prefix="cl_tasks-album-"))
    try:
        server = workdir / "server"
        photos = make_album(server / "album", args.photos)
        mean_mb = sum(path.stat().st_size for path in photos) / len(photos) / 1e6
        ours, vips = [], []
        for _ in range(args.rounds):  # alternated, so a busy spell on the machine hits both
            ours.append(measure_cl_tasks(server, photos))
            vips.append(measure_vips(python, workdir, photos))
        figures: dict[str, Any] = {
            "photos": args.photos,
            "jobs": 2 * args.photos,
            "photo": f"{PHOTO_12MP[0]}x{PHOTO_12MP[1]} JPEG q{PHOTO_QUALITY}, mean {mean_mb:.1f} MB",
            "rounds": args.rounds,
            "cl_tasks seconds (first insert -> last completion), best": round(min(ours), 2),
            "libvips seconds (2 processes, no queue), best": round(min(vips), 2),
            "ratio (best / best)": round(min(ours) / min(vips), 2),
            "cl_tasks seconds, every round": [round(value, 2) for value in ours],
            "libvips seconds, every round": [round(value, 2) for value in vips],
            "engines": _module_script(python, "engines", str(photos[0])),
        }
        if not args.no_memory:
            figures["peak RSS MiB"] = memory(python, workdir, photos[0])
        print(json.dumps(figures, indent=1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
