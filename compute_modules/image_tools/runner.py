"""Runner of the image_tools compute module: image_resize and image_conversion.

Speaks the cl_tasks runner protocol (see cl_tasks/runner.py): job specs as JSON
lines on stdin; progress, result or error as JSON lines on stdout; logs on
stderr. The image work (engines, orientation, colour, modes, animation,
metadata, atomic writes) is :mod:`photos`; docs/photos.md has the decisions.

image_resize
    input_paths, output_paths (same length, unique), width, height (pixels,
    1..20000), maintain_aspect_ratio (default false: exactly width x height;
    true: fit inside, aspect kept, never enlarged, as Pillow's ``thumbnail``).
    Lanczos-grade. Output:
    {"processed_files": [...], "dimensions": {"width", "height"}} where
    dimensions are those of the first output image.
image_conversion
    input_paths, output_paths, format (png, jpg, jpeg, webp, gif, bmp, tiff),
    quality (1..100, default 85; used for jpg/jpeg/webp). Alpha is flattened
    onto white for JPEG and BMP (GIF: partly transparent pixels).
    Output: {"processed_files", "format", "quality"}.

Images above Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) are
refused, naming the limit. Output folders are created.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import photos
from PIL import Image

#: Largest width or height a job may ask for, in pixels.
MAX_SIDE = 20000
FORMATS = {
    "png": "PNG",
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "webp": "WEBP",
    "gif": "GIF",
    "bmp": "BMP",
    "tiff": "TIFF",
}
RESIZE_PARAMS = {"input_paths", "output_paths", "width", "height", "maintain_aspect_ratio"}
CONVERSION_PARAMS = {"input_paths", "output_paths", "format", "quality"}

warnings.simplefilter("error", Image.DecompressionBombWarning)


class JobFailed(Exception):
    """The job cannot be done; the message is for the user."""


def emit(**message: Any) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def check_known(params: dict[str, Any], known: set[str], task_type: str) -> None:
    unknown = sorted(set(params) - known)
    if unknown:
        raise JobFailed(f"unknown parameter {unknown[0]!r} for {task_type}; expected {sorted(known)}")


def paths(params: dict[str, Any]) -> list[tuple[str, str]]:
    inputs, outputs = params.get("input_paths"), params.get("output_paths")
    for name, value in (("input_paths", inputs), ("output_paths", outputs)):
        if value is None:
            raise JobFailed(f"missing parameter {name}")
        if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
            raise JobFailed(f"parameter {name} must be a non-empty list of paths")
    assert isinstance(inputs, list) and isinstance(outputs, list)
    if len(inputs) != len(outputs):
        raise JobFailed(f"input_paths has {len(inputs)} paths but output_paths has {len(outputs)}")
    if len(set(outputs)) != len(outputs):
        raise JobFailed("output_paths must be unique")
    return list(zip(inputs, outputs, strict=True))


def integer(params: dict[str, Any], name: str, low: int, high: int, default: int | None = None) -> int:
    value = params.get(name, default)
    if value is None:
        raise JobFailed(f"missing parameter {name}")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise JobFailed(f"parameter {name} must be an integer from {low} to {high}, got {value!r}")
    return value


def format_of(path: str) -> str:
    fmt = FORMATS.get(Path(path).suffix.lower().lstrip("."))
    if fmt is None:
        raise JobFailed(f"output path {path} has an unsupported extension; use one of {sorted(FORMATS)}")
    return fmt


def image_resize(job_id: str, params: dict[str, Any]) -> dict[str, Any]:
    check_known(params, RESIZE_PARAMS, "image_resize")
    pairs = paths(params)
    box = (integer(params, "width", 1, MAX_SIDE), integer(params, "height", 1, MAX_SIDE))
    keep_aspect = params.get("maintain_aspect_ratio", False)
    if not isinstance(keep_aspect, bool):
        raise JobFailed(f"parameter maintain_aspect_ratio must be true or false, got {keep_aspect!r}")
    sizes = []
    for done, (source, target) in enumerate(pairs, start=1):
        fmt = format_of(target)
        photo = photos.load(source, box, keep_aspect, animate=fmt in photos.ANIMATED_FORMATS)
        photos.encode(photo, target, fmt)
        sizes.append(photo.first.size)
        emit(job_id=job_id, event="progress", progress=100.0 * done / len(pairs))
    return {
        "processed_files": [target for _, target in pairs],
        "dimensions": {"width": sizes[0][0], "height": sizes[0][1]},
    }


def image_conversion(job_id: str, params: dict[str, Any]) -> dict[str, Any]:
    check_known(params, CONVERSION_PARAMS, "image_conversion")
    pairs = paths(params)
    name = params.get("format")
    if name is None:
        raise JobFailed("missing parameter format")
    if not isinstance(name, str) or name.lower() not in FORMATS:
        raise JobFailed(f"parameter format must be one of {sorted(FORMATS)}, got {name!r}")
    name = name.lower()
    quality = integer(params, "quality", 1, 100, default=85)
    fmt = FORMATS[name]
    options = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    for done, (source, target) in enumerate(pairs, start=1):
        photo = photos.load(source, animate=fmt in photos.ANIMATED_FORMATS)
        photos.encode(photo, target, fmt, **options)
        emit(job_id=job_id, event="progress", progress=100.0 * done / len(pairs))
    return {"processed_files": [target for _, target in pairs], "format": name, "quality": quality}


TASKS = {"image_resize": image_resize, "image_conversion": image_conversion}


def serve(line: str) -> None:
    spec = json.loads(line)
    job_id = spec.get("job_id", "")
    try:
        task = TASKS.get(spec.get("task_type"))
        if task is None:
            raise JobFailed(f"image_tools does not run task type {spec.get('task_type')!r}")
        params = spec.get("params")
        if not isinstance(params, dict):
            raise JobFailed("params must be a JSON object")
        emit(job_id=job_id, event="result", output=task(job_id, params))
    except photos.PhotoError as exc:
        # errno (e.g. "ENOSPC") tells the worker a full disk, not the job, is at fault.
        emit(job_id=job_id, event="error", message=str(exc), **({"errno": exc.errno} if exc.errno else {}))
    except JobFailed as exc:
        emit(job_id=job_id, event="error", message=str(exc))
    except Exception as exc:  # a bug here must not take the warm runner down
        print(f"job {job_id} failed unexpectedly: {exc!r}", file=sys.stderr)
        emit(job_id=job_id, event="error", message=f"image_tools failed unexpectedly: {exc!r}")


def main() -> None:
    photos.configure()
    print("image_tools runner ready", file=sys.stderr)
    for line in sys.stdin:
        if line.strip():
            serve(line)


if __name__ == "__main__":
    main()
