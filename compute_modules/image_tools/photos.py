"""Photos as people have them: decode, make upright, shrink, normalise modes and colour, encode.

The image engine of the image_tools runner (docs/photos.md says why, with figures):

* **Decoding** is Pillow's, plus HEIC/HEIF through ``pillow-heif`` and AVIF through
  Pillow's own plugin. Images above ``Image.MAX_IMAGE_PIXELS`` are refused naming
  the limit; an animation is refused when its frames together exceed it.
* **Shrinking** is Pillow's ``thumbnail`` rule wherever JPEG DCT scaling can take the
  decode down by 2 or more while keeping a 2x margin over the target (thumbnails:
  ``draft`` + ``resize(LANCZOS, reducing_gap=2.0)``, as fast as libvips and closer
  to a full Lanczos), and for every non-JPEG input. An RGB or greyscale JPEG that
  must be decoded in full (previews: less than 4x smaller) goes to libvips'
  ``thumbnail`` (pyvips), whose decode and Lanczos-3 are 1.7-2.5x faster than
  Pillow's. Both engines get the same target size, computed here, so outputs have
  identical dimensions.
* **Orientation**: the EXIF orientation (1-8) is applied; outputs are upright and
  carry no EXIF.
* **Colour**: an embedded ICC profile is kept in outputs that can carry it (JPEG,
  PNG, WebP, TIFF), with the pixels untouched; for GIF and BMP the pixels are
  converted to sRGB. CMYK is converted to sRGB (through its profile when it has one).
* **Modes**: 16-bit and 32-bit integer images stay 16-bit in PNG and TIFF and are
  scaled to 8 bits elsewhere; float images stay float in TIFF and are mapped to 8
  bits elsewhere (0..1 when the data lies there, else its own min..max). Alpha is
  kept in PNG, WebP and TIFF; flattened onto white for JPEG and BMP (whose readers
  ignore a fourth channel); GIF, which has only on/off transparency, keeps the fully
  transparent pixels transparent and flattens the partly transparent ones onto white.
* **Animation**: animated inputs keep every frame (durations, loop) in GIF and WebP
  outputs; other formats get the first frame.
* **Metadata**: nothing of the input's EXIF, XMP or GPS reaches an output.
* **Writes** go to a hidden temporary file in the output's folder, then
  ``os.replace``: a killed runner never leaves a half-written output (at most a
  ``.*.part`` file beside it). A write refused by the OS names its errno to the
  worker (``ENOSPC``: the job waits for space and runs again).
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pillow_heif
import pyvips
from PIL import Image, ImageCms, ImageSequence, UnidentifiedImageError

#: EXIF tag holding the orientation (1 = upright, 2-8 = mirrored and/or rotated).
ORIENTATION_TAG = 0x0112
#: Orientations whose upright image has width and height swapped.
TRANSPOSED = {5, 6, 7, 8}
#: What makes an image of each EXIF orientation upright (as ImageOps.exif_transpose does).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
#: Pillow's thumbnail rule: decode/reduce down to no less than this multiple of the target
#: before the final Lanczos pass (libvips' thumbnail keeps the same 2x margin).
REDUCING_GAP = 2.0
#: Formats that keep an ICC profile; the others get sRGB pixels.
ICC_FORMATS = {"JPEG", "PNG", "WEBP", "TIFF"}
#: Formats that keep every frame of an animated input.
ANIMATED_FORMATS = {"GIF", "WEBP"}
#: The divisor taking a 16-bit sample (0..65535) to 8 bits (0..255).
TO_8BIT = 257
#: Colour space signature (ICC header bytes 16..20) per mode family.
ICC_SPACE = {"RGB": b"RGB ", "L": b"GRAY"}
WHITE = (255, 255, 255)
#: Colours of a GIF palette left to the picture, and the index kept for transparency.
GIF_COLOURS = 255
GIF_TRANSPARENT = 255


class PhotoError(Exception):
    """The image cannot be read or written; the message is for the user.

    ``errno`` is the name of the OS error behind a failed write (``"ENOSPC"``: the disk
    is full), which the runner passes on so the worker waits for space instead of
    failing the job.
    """

    def __init__(self, message: str, errno_name: str = "") -> None:
        super().__init__(message)
        self.errno = errno_name


@dataclass
class Photo:
    """Upright frames of one input in a working mode, and what outputs may keep of it."""

    frames: list[Image.Image]
    icc: bytes | None = None
    durations: list[int] = field(default_factory=list)
    loop: int = 0

    @property
    def first(self) -> Image.Image:
        return self.frames[0]


def configure() -> None:
    """Process-wide engine set-up: HEIF opener, no libvips cache (files change under a path)."""
    pillow_heif.register_heif_opener()
    pyvips.cache_set_max(0)
    pyvips.cache_set_max_mem(0)
    pyvips.cache_set_max_files(0)


def open_header(path: str) -> Image.Image:
    """The image at ``path``, opened lazily (header only); refuses bombs naming the limit."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise PhotoError(f"input image {path} does not exist") from None
    except PermissionError:
        raise PhotoError(f"input image {path} is not readable") from None
    except IsADirectoryError:
        raise PhotoError(f"input image {path} is a folder, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise too_large(path, exc) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PhotoError(f"input image {path} is not a readable image: {exc}") from None


def too_large(path: str, exc: Exception) -> PhotoError:
    return PhotoError(f"input image {path} is too large: {exc} (limit {Image.MAX_IMAGE_PIXELS} pixels)")


def orientation(header: Image.Image) -> int:
    try:
        value = header.getexif().get(ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(header: Image.Image) -> tuple[int, int]:
    width, height = header.size
    return (height, width) if orientation(header) in TRANSPOSED else (width, height)


def target_size(size: tuple[int, int], box: tuple[int, int], keep_aspect: bool) -> tuple[int, int]:
    """``box`` itself, or (keep_aspect) Pillow's ``thumbnail`` rule: fit inside, never enlarge."""
    if not keep_aspect:
        return box
    width, height = size
    x, y = box
    if x >= width and y >= height:
        return size
    aspect = width / height

    def round_aspect(number: float, key: Any) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    if x / y >= aspect:
        x = round_aspect(y * aspect, key=lambda n: abs(aspect - n / y))
    else:
        y = round_aspect(x / aspect, key=lambda n: 0 if n == 0 else abs(aspect - x / n))
    return x, y


def load(
    path: str, box: tuple[int, int] | None = None, keep_aspect: bool = False, animate: bool = False
) -> Photo:
    """Decode ``path`` upright in a working mode; resized to ``box`` (see :func:`target_size`) if given."""
    header = open_header(path)
    try:
        icc = header.info.get("icc_profile") or None
        size = None if box is None else target_size(upright_size(header), box, keep_aspect)
        if size is not None and needs_full_jpeg_decode(header, size):
            photo = Photo([vips_thumbnail(path, size, header.mode)], icc)
        else:
            photo = _decode(path, header, size, animate, icc)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        header.close()
        raise too_large(path, exc) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        header.close()
        raise PhotoError(f"input image {path} is not a readable image: {exc}") from None
    except BaseException:
        header.close()
        raise
    # Identity, not ==: Image.__eq__ compares pixels. The header may be the decoded picture
    # itself (loaded in place), which closing would free.
    if not any(frame is header for frame in photo.frames):
        header.close()
    return photo


def needs_full_jpeg_decode(header: Image.Image, size: tuple[int, int]) -> bool:
    """An RGB/grey JPEG that DCT scaling (1/2 or less) cannot shrink toward ``size`` with a 2x margin."""
    if header.format != "JPEG" or header.mode not in ("RGB", "L"):
        return False
    stored = (size[1], size[0]) if orientation(header) in TRANSPOSED else size
    return any(side < 2 * REDUCING_GAP * want for side, want in zip(header.size, stored, strict=True))


def vips_thumbnail(path: str, size: tuple[int, int], mode: str) -> Image.Image:
    try:
        # From a source, not a file name: libvips would parse "[...]" in a name as options.
        source = pyvips.Source.new_from_file(path)
        thumb = pyvips.Image.thumbnail_source(
            source, size[0], height=size[1], size="force", option_string="fail_on=error"
        )
        pixels = thumb.write_to_memory()
    except pyvips.Error as exc:
        reason = (str(exc).strip().splitlines() or ["libvips failed"])[-1].strip()
        raise PhotoError(f"input image {path} is not a readable image: {reason}") from None
    if (thumb.bands, thumb.format) != (len(mode), "uchar"):
        raise PhotoError(f"input image {path} decoded as {thumb.bands} bands of {thumb.format}, not {mode}")
    return Image.frombytes(mode, (thumb.width, thumb.height), pixels)


def _decode(
    path: str, header: Image.Image, size: tuple[int, int] | None, animate: bool, icc: bytes | None
) -> Photo:
    animated = animate and bool(getattr(header, "is_animated", False))
    count = int(getattr(header, "n_frames", 1)) if animated else 1
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and count * header.width * header.height > limit:
        raise PhotoError(
            f"input image {path} is too large: {count} frames of {header.width}x{header.height} exceed the"
            f" limit of {limit} pixels for all frames together"
        )
    turn = orientation(header)
    if size is not None and header.format == "JPEG":
        stored = (size[1], size[0]) if turn in TRANSPOSED else size
        header.draft(None, (int(stored[0] * REDUCING_GAP), int(stored[1] * REDUCING_GAP)))
    photo = Photo([], icc, loop=int(header.info.get("loop", 0) or 0))
    frames = ImageSequence.Iterator(header) if animated else [header]
    for frame in frames:
        if not animated:
            frame.load()  # in place (no copy: a 48 MP photo is 192 MB); the file closes after
        image = working_mode(frame.convert("RGBA") if animated else frame, icc)
        image = image.transpose(UPRIGHT[turn]) if turn in UPRIGHT else image
        if size is not None and image.size != size:
            image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
        photo.frames.append(image)
        photo.durations.append(int(frame.info.get("duration", 0) or 0))
    if header.mode == "CMYK":
        photo.icc = None  # converted to sRGB in working_mode
    return photo


def working_mode(image: Image.Image, icc: bytes | None) -> Image.Image:
    """A mode Pillow resizes well, keeping depth and alpha: L, LA, RGB, RGBA, I or F."""
    mode = image.mode
    if mode == "CMYK":
        return to_srgb(image, icc, "RGB")
    if mode in ("1", "P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        return image.convert("L" if mode == "1" else "RGBA" if has_alpha else "RGB")
    if mode.startswith("I;16") or mode == "I":
        return image.convert("I") if mode != "I" else image
    if mode in ("L", "LA", "RGB", "RGBA", "F"):
        return image
    return image.convert("RGBA" if "A" in mode or "transparency" in image.info else "RGB")


def to_srgb(image: Image.Image, icc: bytes | None, mode: str) -> Image.Image:
    """``image`` converted to sRGB through its profile, or naively when it has none (or a bad one)."""
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(image, source, srgb, outputMode=mode)
        except (ImageCms.PyCMSError, OSError, ValueError) as exc:
            print(f"ICC profile not usable ({exc}); colours converted without it", file=sys.stderr)
        else:
            if converted is not None:
                return converted
    return image.convert(mode)


def eight_bit(image: Image.Image) -> Image.Image:
    """Greyscale of any depth as 8-bit L (16-bit scaled, float mapped from 0..1 or its range)."""
    if image.mode == "I":
        return image.point(lambda value: value / TO_8BIT).convert("L")
    if image.mode == "F":
        low, high = cast(tuple[float, float], image.getextrema())  # one band: (min, max)
        if low >= 0.0 and high <= 1.0:
            low, high = 0.0, 1.0
        span = (high - low) or 1.0
        return image.point(lambda value: (value - low) * 255.0 / span).convert("L")
    return image


def for_format(image: Image.Image, fmt: str) -> Image.Image:
    """``image`` in a mode ``fmt`` writes without loss of alpha (JPEG: flattened onto white)."""
    mode = image.mode
    if mode == "I" and fmt in ("PNG", "TIFF"):
        return image.convert("I;16")  # clamps to 0..65535
    if mode == "F" and fmt == "TIFF":
        return image
    image = eight_bit(image)
    mode = image.mode
    if fmt in ("JPEG", "BMP"):
        return flatten(image) if mode in ("LA", "RGBA") else image
    if fmt == "WEBP" and mode in ("L", "LA"):
        return image.convert("RGBA" if mode == "LA" else "RGB")
    if fmt == "GIF" and mode in ("LA", "RGBA"):
        return gif_frame(image)
    return image


def gif_frame(image: Image.Image) -> Image.Image:
    """A palette image: fully transparent pixels transparent, the rest flattened onto white."""
    clear = image.getchannel("A").point(lambda alpha: 255 if alpha == 0 else 0)
    frame = flatten(image).convert("RGB").quantize(GIF_COLOURS)
    if clear.getbbox() is not None:
        frame.paste(GIF_TRANSPARENT, mask=clear)
        frame.info["transparency"] = GIF_TRANSPARENT
    return frame


def flatten(image: Image.Image) -> Image.Image:
    """LA/RGBA onto a white background: L or RGB."""
    grey = image.mode == "LA"
    background = Image.new("L" if grey else "RGB", image.size, 255 if grey else WHITE)
    background.paste(image.convert("L" if grey else "RGB"), mask=image.getchannel("A"))
    return background


def profile_fits(icc: bytes, mode: str) -> bool:
    family = "L" if mode in ("L", "LA", "I;16", "F") else "RGB"
    return icc[16:20] == ICC_SPACE[family]


def encode(photo: Photo, path: str, fmt: str, **options: Any) -> None:
    """Write ``photo`` to ``path`` as ``fmt`` through a temporary file and ``os.replace``."""
    frames = [for_format(frame, fmt) for frame in photo.frames]
    if photo.icc and fmt in ICC_FORMATS and profile_fits(photo.icc, frames[0].mode):
        options["icc_profile"] = photo.icc
    elif photo.icc and frames[0].mode in ("RGB", "RGBA"):
        frames = [to_srgb(frame, photo.icc, frame.mode) for frame in frames]
    if len(frames) > 1 and fmt in ANIMATED_FORMATS:
        options.update(save_all=True, append_images=frames[1:], duration=photo.durations, loop=photo.loop)
    else:
        frames = frames[:1]
    # No EXIF, XMP, GPS or TIFF tags of the input ride along (only transparency): Pillow's
    # TIFF writer copies some tags (XMP among them) from an image that is still a TIFF file.
    first = frames[0].copy() if hasattr(frames[0], "tag_v2") else frames[0]
    first.info = {key: value for key, value in first.info.items() if key == "transparency"}
    write_atomically(first, Path(path), fmt, options)


def write_atomically(image: Image.Image, target: Path, fmt: str, options: dict[str, Any]) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False
        ) as part:
            try:
                image.save(part, format=fmt, **options)
                part.flush()
            except BaseException:
                part.close()
                with contextlib.suppress(OSError):
                    os.unlink(part.name)
                raise
        os.replace(part.name, target)
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "")
        raise PhotoError(f"cannot write {target} as {fmt}: {exc}", name) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise PhotoError(f"cannot write {target} as {fmt}: {exc}") from None
