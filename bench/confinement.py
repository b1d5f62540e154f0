"""Warm-runner throughput with and without runner confinement, side by side, in one run.

``.venv/bin/python -m bench.confinement [--jobs N]``: the image_tools runner (the test
venv with Pillow, ``.venvs-test/image_tools``, built by the tests) resizes one small PNG
N times, through the worker's own code path (``cl_tasks.staging.run_job``), in each mode:

* ``off``: warm runner, no sandbox, the job's real paths (``RUNNER_CONFINEMENT=off``);
* ``landlock``: warm runner, Landlock launcher only, files staged (no bwrap);
* ``bubblewrap``: warm runner under bwrap + Landlock, files staged (the default);
* ``bubblewrap, fresh per job``: a new confined runner for every job (what per-job
  confinement would cost), on N/10 jobs.

Prints a Markdown table (jobs/s, ms per job, ratio to ``off``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from cl_tasks.confinement import Confinement, detect
from cl_tasks.modules import read_module
from cl_tasks.runner import Runner
from cl_tasks.staging import Protected, run_job

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "compute_modules" / "image_tools"
PYTHON = ROOT / ".venvs-test" / "image_tools" / "bin" / "python"
#: Side of the input image in pixels, and of the output.
INPUT_SIDE, OUTPUT_SIDE = 256, 64
DEFAULT_JOBS = 300


def _params(n: int) -> dict[str, object]:
    return {
        "input_paths": ["in.png"],
        "output_paths": [f"out/{n % 10}.png"],
        "width": OUTPUT_SIDE,
        "height": OUTPUT_SIDE,
    }


def _measure(make_runner: Callable[[], Runner], jobs: int, fresh: bool, protected: Protected) -> float:
    """Seconds per job (after one warm-up job)."""
    runner = make_runner()
    run_job(runner, "warm-up", "image_resize", _params(0), lambda _: None, protected)
    start = time.perf_counter()
    for n in range(jobs):
        if fresh:
            runner.kill()
            runner = make_runner()
        run_job(runner, f"job-{n}", "image_resize", _params(n), lambda _: None, protected)
    elapsed = time.perf_counter() - start
    runner.kill()
    return elapsed / jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS)
    jobs = parser.parse_args().jobs
    assert PYTHON.exists(), f"{PYTHON} is missing: run the image tests once (they build it)"
    module = read_module(MODULE)
    data = Path(tempfile.mkdtemp(prefix="bench-confinement-"))
    Image.new("RGB", (INPUT_SIDE, INPUT_SIDE), (30, 120, 200)).save(data / "in.png")
    protected = Protected((data / "media_store.db",), (ROOT / ".venvs-test", MODULE.parent))
    best = detect()
    modes = [
        ("off", Confinement("off"), False, jobs),
        ("landlock", Confinement("landlock", reason="bench"), False, jobs),
        ("bubblewrap", best, False, jobs),
        ("bubblewrap, fresh per job", best, True, max(jobs // 10, 5)),
    ]
    results = []
    try:
        for name, confinement, fresh, count in modes:
            if confinement.mode != name.split(",")[0]:
                results.append((name, None))
                continue
            factory = lambda c=confinement: Runner(module, PYTHON, data, c)  # noqa: E731
            results.append((name, _measure(factory, count, fresh, protected)))
    finally:
        shutil.rmtree(data, ignore_errors=True)
    base = results[0][1] or 1.0
    print(
        f"| mode ({jobs} image_resize jobs {INPUT_SIDE}->{OUTPUT_SIDE} px) | jobs/s | ms/job | time vs off |"
    )
    print("|---|---:|---:|---:|")
    for name, seconds in results:
        if seconds is None:
            print(f"| {name} | n/a on this machine | | |")
        else:
            print(f"| {name} | {1 / seconds:.0f} | {seconds * 1000:.2f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
