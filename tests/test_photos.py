"""Real photos through image_tools: every EXIF orientation, ICC profiles, CMYK, 16-bit, float,
LA, palette + tRNS, 1-bit, animated GIF/WebP, HEIC and AVIF, to every output format of both
task types; pixels compared with Pillow's Lanczos of the upright picture; no GPS in any output;
``maintain_aspect_ratio`` never enlarges. docs/photos.md has the policy these tests hold.

The format matrix talks to one warm runner over its stdin/stdout protocol (fast); the jobs
that go the whole way run in a real worker on the API's era-A ``jobs`` table.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageCms, ImageStat

from bench.album import photo_like
from cl_tasks.modules import read_module, venv_python
from tests.conftest import (
    ROOT,
    STACK,
    TEST_MODULES,
    TEST_VENVS,
    Database,
    Worker,
    insert_job,
    wait_for_job,
)
from tests.support import wait_until

MODULE = TEST_MODULES / "image_tools"
ERA_A = ROOT / "tests" / "fixtures" / "cl_server" / "jobs_era_a.sql"
FORMATS = ("png", "jpg", "webp", "gif", "bmp", "tiff")
PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF"}
#: The cases tests/photos/make.py writes (checked against its cases.json).
CASES = (
    *(f"orient{n}" for n in range(1, 9)),
    "orient3-png",
    "orient6-png",
    "p3",
    "p3-png",
    "cmyk",
    "cmyk-icc",
    "gray16",
    "float",
    "la",
    "palette-trns",
    "bilevel",
    "anim-gif",
    "anim-webp",
    "photo",
    "photo-avif",
    "heic-orient6",
    "avif-orient6",
)
#: The box of the resize jobs (the pictures are 480x360; exact size, aspect not kept).
BOX = (200, 160)
#: Mean absolute difference (0..255 per channel) an output may have from the reference:
#: resampling differences, plus what each lossy step may add. A picture turned or mirrored
#: the wrong way is ~60 off; a blank one ~100.
BASE_DIFF = 2.5
LOSSY_DIFF = {"jpg": 3.0, "webp": 3.0, "gif": 6.0}
LOSSY_INPUT_DIFF = 2.0
GPS_IFD = 0x8825
StartWorker = Callable[..., Worker]


class Runner:
    """The image_tools runner of the module's venv, spoken to over its JSON-lines protocol."""

    def __init__(self, python: Path) -> None:
        self.process = subprocess.Popen(
            [str(python), str(MODULE / "runner.py")],
            cwd=MODULE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def run(self, task_type: str, params: dict[str, Any]) -> dict[str, Any]:
        """The job's last line: its result or its error."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"job_id": "t", "task_type": task_type, "params": params}) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            reply: dict[str, Any] = json.loads(line)
            if reply["event"] in ("result", "error"):
                return reply
        raise AssertionError(f"the runner exited with {self.process.wait()}")

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def module_python() -> Path:
    return venv_python(TEST_VENVS, read_module(MODULE))


@pytest.fixture(scope="module")
def photos(module_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The generated cases by name, with ``path`` and ``reference`` (the upright picture)."""
    folder = tmp_path_factory.mktemp("photos")
    subprocess.run([str(module_python), str(ROOT / "tests" / "photos" / "make.py"), str(folder)], check=True)
    cases = {case["name"]: case for case in json.loads((folder / "cases.json").read_text())}
    assert sorted(cases) == sorted(CASES)
    for case in cases.values():
        case["path"] = folder / case["file"]
        case["reference"] = Image.open(folder / f"{case['name']}.ref.png").convert("RGBA")
    return cases


@pytest.fixture(scope="module")
def runner(module_python: Path) -> Iterator[Runner]:
    started = Runner(module_python)
    yield started
    started.close()


def on_white(image: Image.Image) -> Image.Image:
    """Any output as RGB, its alpha (or GIF/PNG transparency) composed onto white."""
    if image.mode in ("I;16", "I"):
        image = image.point(lambda value: value / 257).convert("L")
    elif image.mode == "F":
        image = image.point(lambda value: value * 255).convert("L")
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return background


def difference(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size, (a.size, b.size)
    return sum(ImageStat.Stat(ImageChops.difference(on_white(a), on_white(b))).mean) / 3


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def assert_no_personal_metadata(image: Image.Image) -> None:
    exif = image.getexif()
    assert GPS_IFD not in exif and not exif.get_ifd(GPS_IFD), f"GPS in {getattr(image, 'filename', image)}"
    assert "xmp" not in image.info and "exif" not in image.info


# -- the format matrix, straight through the runner ---------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("task", ["image_resize", "image_conversion"])
@pytest.mark.parametrize("name", CASES)
def test_photo_to_every_format(
    photos: dict[str, dict[str, Any]], runner: Runner, tmp_path: Path, name: str, task: str, fmt: str
) -> None:
    # Given a real-world-like input and what it looks like upright
    case = photos[name]
    reference: Image.Image = case["reference"]
    target = tmp_path / "out" / f"{name}.{fmt}"
    params: dict[str, Any] = {"input_paths": [str(case["path"])], "output_paths": [str(target)]}
    if task == "image_resize":
        params.update(width=BOX[0], height=BOX[1])
    else:
        params.update(format=fmt)
    # When the runner does the job
    reply = runner.run(task, params)
    # Then it completes, leaving only the output in its folder (no half-written .part file)
    assert reply["event"] == "result", reply
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    expected_size = BOX if task == "image_resize" else reference.size
    if task == "image_resize":
        assert reply["output"]["dimensions"] == {"width": BOX[0], "height": BOX[1]}
        reference = reference.resize(BOX, Image.Resampling.LANCZOS)
    with Image.open(target) as output:
        # And the output opens as the format asked for, upright, at the size asked for
        assert output.format == PIL_FORMAT[fmt] and output.size == expected_size
        assert_no_personal_metadata(output)
        frames = int(getattr(output, "n_frames", 1))
        if "frames" in case:
            # Animations keep every frame in GIF and WebP, the first frame elsewhere
            assert frames == (case["frames"] if fmt in ("gif", "webp") else 1)
            for index in range(frames):
                output.seek(index)
                centre = on_white(output).getpixel((output.width // 2, output.height // 2))
                assert centre == pytest.approx(case["colours"][index], abs=12), (index, centre)
            return
        assert frames == 1
        # ICC: kept where the format carries one (pixels untouched), else converted to sRGB
        icc = bytes.fromhex(case["icc"]) if "icc" in case else None
        if icc is not None and fmt not in ("gif", "bmp"):
            assert output.info.get("icc_profile") == icc
        elif icc is not None:
            assert "icc_profile" not in output.info
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(
                reference, source, ImageCms.createProfile("sRGB"), outputMode="RGBA"
            )
            assert converted is not None
            reference = converted
        # Depth: 16-bit stays 16-bit in PNG and TIFF, float stays float in TIFF
        if case.get("sixteen") and fmt in ("png", "tiff"):
            assert output.mode == "I;16"
        if case.get("float") and fmt == "tiff":
            assert output.mode == "F"
        # Alpha is flattened onto white for JPEG and BMP only (GIF keeps the fully clear pixels)
        if case.get("alpha"):
            assert has_alpha(output) == (fmt not in ("jpg", "bmp")), output.mode
        limit = BASE_DIFF + LOSSY_DIFF.get(fmt, 0.0) + (LOSSY_INPUT_DIFF if case.get("lossy") else 0.0)
        assert difference(output, reference) <= limit


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_on_the_draft_path(
    photos: dict[str, dict[str, Any]], runner: Runner, tmp_path: Path, orientation: int
) -> None:
    # Given a JPEG of each orientation and a box 4.8x smaller (DCT-scaled decode, then Lanczos;
    # the matrix's 200x160 box is the full-decode path)
    case = photos[f"orient{orientation}"]
    target = tmp_path / "small.png"
    # When it is resized
    reply = runner.run(
        "image_resize",
        {"input_paths": [str(case["path"])], "output_paths": [str(target)], "width": 100, "height": 75},
    )
    # Then it is upright and close to Lanczos of the upright picture
    assert reply["event"] == "result", reply
    expected = case["reference"].resize((100, 75), Image.Resampling.LANCZOS)
    with Image.open(target) as output:
        assert difference(output, expected) <= BASE_DIFF + LOSSY_INPUT_DIFF


def test_quality_is_lanczos_grade(runner: Runner, tmp_path: Path) -> None:
    # Given a photo-like JPEG (regions, hard edges, texture, grain: where resamplers differ)
    photo = tmp_path / "big.jpg"
    photo_like((2400, 1800)).save(photo, quality=90)
    with Image.open(photo) as decoded:
        full = decoded.convert("RGB")
    for box in ((256, 192), (1280, 960)):
        # When the runner makes a thumbnail and a preview (lossless, so only resampling counts)
        target = tmp_path / f"{box[0]}.png"
        reply = runner.run(
            "image_resize",
            {"input_paths": [str(photo)], "output_paths": [str(target)], "width": box[0], "height": box[1]},
        )
        assert reply["event"] == "result", reply
        # Then it is closer to Pillow's Lanczos of the fully decoded picture than bicubic is
        lanczos = full.resize(box, Image.Resampling.LANCZOS)
        bicubic = full.resize(box, Image.Resampling.BICUBIC)
        with Image.open(target) as output:
            assert difference(output, lanczos) < difference(bicubic, lanczos), box


def test_animation_over_the_pixel_limit_is_refused_naming_it(runner: Runner, tmp_path: Path) -> None:
    # Given an animated GIF whose frames together exceed the decompression-bomb limit
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None
    side = 1200
    count = limit // (side * side) + 1
    frames = [Image.new("P", (side, side), index % 2) for index in range(count)]
    frames[0].save(tmp_path / "long.gif", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(tmp_path / "long.gif") as check:
        assert getattr(check, "n_frames", 1) == count
    # When it is to become a WebP animation
    reply = runner.run(
        "image_conversion",
        {
            "input_paths": [str(tmp_path / "long.gif")],
            "output_paths": [str(tmp_path / "long.webp")],
            "format": "webp",
        },
    )
    # Then the job fails naming the limit, and writes nothing
    assert reply["event"] == "error"
    assert "is too large" in reply["message"] and f"limit of {limit} pixels" in reply["message"]
    assert not (tmp_path / "long.webp").exists()


def test_a_runner_killed_mid_write_leaves_no_half_written_output(module_python: Path, tmp_path: Path) -> None:
    # Given a 48 MP photo to write as an uncompressed TIFF (144 MB: a write that takes a while)
    photo = tmp_path / "big.jpg"
    Image.linear_gradient("L").resize((8000, 6000)).convert("RGB").save(photo, quality=80)
    out = tmp_path / "out"
    killed = Runner(module_python)
    assert killed.process.stdin is not None
    spec = {
        "job_id": "k",
        "task_type": "image_conversion",
        "params": {"input_paths": [str(photo)], "output_paths": [str(out / "big.tiff")], "format": "tiff"},
    }
    killed.process.stdin.write(json.dumps(spec) + "\n")
    killed.process.stdin.flush()

    # When the runner is killed while the output is being written (its temporary file has bytes)
    def writing() -> bool:
        assert killed.process.poll() is None, "the runner exited before its write was seen"
        assert not (out / "big.tiff").exists(), "the output appeared before its write was seen"
        return any(part.stat().st_size > 0 for part in out.glob(".big.tiff.*.part"))

    wait_until(writing, 120, "the output's temporary file holding bytes", every=0.001)
    killed.process.kill()
    killed.process.wait(timeout=30)
    # Then the output path holds nothing: only the hidden partial file is left beside it
    assert not (out / "big.tiff").exists()
    assert [part.name.startswith(".big.tiff.") for part in out.iterdir()] == [True]


# -- through a real worker, on the API's era-A jobs table ---------------------------------


@pytest.fixture
def server_dir(tmp_path: Path) -> Path:
    """CL_SERVER_DIR whose media_store.db has the API's exact era-A ``jobs`` table."""
    import sqlite3

    folder = tmp_path / "data"
    folder.mkdir()
    if STACK == "sqlite":
        with sqlite3.connect(folder / "media_store.db") as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(ERA_A.read_text())
        conn.close()
    return folder


def insert_api_job(database: Database, job_id: str, task_type: str, params: dict[str, Any]) -> None:
    """A row as the API inserts it: every NOT NULL column filled (era A has no defaults)."""
    insert_job(database, job_id, task_type, params, era="a")


@pytest.mark.skipif(STACK != "sqlite", reason="era-A table made here in SQLite; the stacks run test_jobs")
def test_phone_photos_through_a_worker(
    photos: dict[str, dict[str, Any]],
    server_dir: Path,
    database: Database,
    jobs_env: dict[str, str],
    start_worker: StartWorker,
) -> None:
    # Given an album as the API stores it: a sideways JPEG with GPS, a P3 photo, an iPhone HEIC
    album = server_dir / "album"
    album.mkdir()
    for name in ("orient6", "p3", "photo"):
        (album / photos[name]["file"]).write_bytes(photos[name]["path"].read_bytes())
    jobs: dict[str, tuple[str, str, str, dict[str, Any]]] = {
        "thumb": (
            "image_resize",
            "orient6.jpg",
            "thumbs/orient6.jpg",
            {"width": 256, "height": 256, "maintain_aspect_ratio": True},
        ),
        "p3": ("image_resize", "p3.jpg", "previews/p3.webp", {"width": 240, "height": 180}),
        "heic": ("image_conversion", "photo.heic", "converted/photo.jpg", {"format": "jpg"}),
    }
    for job_id, (task, source, target, extra) in jobs.items():
        insert_api_job(
            database,
            job_id,
            task,
            {"input_paths": [f"album/{source}"], "output_paths": [f"album/{target}"], **extra},
        )
    # When a -c 2 worker runs them
    start_worker(jobs_env, "-Q", "image_resize,image_conversion", "-c", "2")
    rows = {job_id: wait_for_job(database, job_id) for job_id in jobs}
    # Then each completes with the API's output shape, upright, in colour, without GPS
    assert {job_id: row["status"] for job_id, row in rows.items()} == dict.fromkeys(jobs, "completed"), rows
    assert json.loads(str(rows["thumb"]["task_output"]))["dimensions"] == {"width": 256, "height": 192}
    assert json.loads(str(rows["heic"]["task_output"]))["format"] == "jpg"
    expected = {
        "thumb": photos["orient6"]["reference"].resize((256, 192), Image.Resampling.LANCZOS),
        "p3": photos["p3"]["reference"].resize((240, 180), Image.Resampling.LANCZOS),
        "heic": photos["photo"]["reference"],
    }
    for job_id, (_, _, target, _) in jobs.items():
        with Image.open(album / target) as output:
            assert_no_personal_metadata(output)
            assert difference(output, expected[job_id]) <= BASE_DIFF + 5.0, job_id
            if job_id == "p3":
                assert output.info.get("icc_profile") == bytes.fromhex(photos["p3"]["icc"])


@pytest.mark.skipif(STACK != "sqlite", reason="era-A table made here in SQLite; the stacks run test_jobs")
def test_fit_inside_never_enlarges_as_pillow_thumbnail(
    server_dir: Path, database: Database, jobs_env: dict[str, str], start_worker: StartWorker
) -> None:
    # Given small and odd-shaped pictures, as JPEG (libvips path) and PNG (Pillow path)
    sizes = {"small": (100, 80), "tall": (333, 1000), "wide": (1000, 333), "odd": (641, 479)}
    boxes = ((400, 400), (100, 100), (50, 1000), (1000, 90))
    expected: dict[str, tuple[int, int]] = {}
    for name, size in sizes.items():
        for ext in ("jpg", "png"):
            Image.new("RGB", size, (90, 120, 200)).save(server_dir / f"{name}.{ext}")
        for box in boxes:
            job_id = f"{name}-{box[0]}x{box[1]}"
            # What upstream does: Pillow's thumbnail (fit inside, aspect kept, never enlarge)
            thumbnail = Image.new("RGB", size)
            thumbnail.thumbnail(box)
            expected[job_id] = thumbnail.size
            for ext in ("jpg", "png"):
                insert_api_job(
                    database,
                    f"{job_id}-{ext}",
                    "image_resize",
                    {
                        "input_paths": [f"{name}.{ext}"],
                        "output_paths": [f"out/{job_id}.{ext}"],
                        "width": box[0],
                        "height": box[1],
                        "maintain_aspect_ratio": True,
                    },
                )
    insert_api_job(
        database,
        "exact",
        "image_resize",
        {"input_paths": ["small.jpg"], "output_paths": ["out/exact.jpg"], "width": 400, "height": 300},
    )
    # When a worker runs them
    start_worker(jobs_env, "-Q", "image_resize", "-c", "2")
    # Then every size is Pillow thumbnail's (never larger than the input), file and output alike
    for job_id, size in expected.items():
        assert size[0] <= sizes[job_id.split("-")[0]][0]
        for ext in ("jpg", "png"):
            row = wait_for_job(database, f"{job_id}-{ext}")
            assert row["status"] == "completed", row
            output = json.loads(str(row["task_output"]))
            assert output["dimensions"] == {"width": size[0], "height": size[1]}, (job_id, ext)
            with Image.open(server_dir / "out" / f"{job_id}.{ext}") as image:
                assert image.size == size
    # And without maintain_aspect_ratio the size is exactly the one asked for, enlarging if need be
    row = wait_for_job(database, "exact")
    assert json.loads(str(row["task_output"]))["dimensions"] == {"width": 400, "height": 300}
