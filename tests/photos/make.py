"""Real-world-like photo files for tests/test_photos.py, made programmatically.

Run with the image_tools module's own interpreter (it has pillow-heif and pyvips)::

    python tests/photos/make.py OUT_DIR

Writes, for every case, the input file ``<name>.<ext>`` and ``<name>.ref.png``: what the
input must look like once decoded and made upright, as 8-bit RGB or RGBA (the
reference that outputs are compared with). ``cases.json`` lists them with what a
test needs to know (ICC profile bytes as hex, alpha, frames).

Pictures show which way is up: four coloured quadrants (red top-left, green
top-right, blue bottom-left, yellow bottom-right) over gradients and grain.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pillow_heif
import pyvips
from PIL import Image, ImageChops, ImageCms, ImageDraw

#: Size of the picture of most cases (stored pixels; orientations 5-8 swap it).
SIZE = (480, 360)
#: EXIF tags: orientation, and the pointer to the GPS IFD.
ORIENTATION_TAG = 0x0112
GPS_IFD = 0x8825
#: A GPS position (latitude N 48 51' 29.6", as rationals) that must never reach an output.
GPS = {1: "N", 2: (48.0, 51.0, 29.6), 3: "E", 4: (2.0, 17.0, 40.2)}
#: How to store a picture so that orientation N makes it upright again (inverse transposes).
STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
QUADRANTS = ((220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 210, 40))


def picture(size: tuple[int, int] = SIZE) -> Image.Image:
    """An upright photo-like RGB picture: quadrants, a gradient, shapes and grain."""
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for index, colour in enumerate(QUADRANTS):
        x, y = index % 2 * width // 2, index // 2 * height // 2
        draw.rectangle((x, y, x + width // 2, y + height // 2), fill=colour)
    gradient = Image.linear_gradient("L").resize(size).convert("RGB")
    image = Image.blend(image, gradient, 0.25)
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 3, height // 3, width // 2, height // 2), fill=(250, 250, 250))
    draw.line((0, height - 1, width - 1, 0), fill=(10, 10, 10), width=3)
    grain = Image.merge("RGB", [Image.effect_noise(size, 6)] * 3)
    return ImageChops.add(image, grain, offset=-128)


def exif(orientation: int = 1) -> bytes:
    tags = Image.Exif()
    tags[ORIENTATION_TAG] = orientation
    tags.get_ifd(GPS_IFD).update(GPS)
    return tags.tobytes()


def display_p3() -> bytes:
    """libvips' built-in Display P3 profile (what iPhones embed)."""
    black = pyvips.Image.black(1, 1, bands=3).copy(interpretation="srgb")
    data: bytes = black.icc_transform("p3", input_profile="srgb").get("icc-profile-data")
    return data


def swop_cmyk() -> bytes:
    """libvips' built-in CMYK (SWOP) profile."""
    black = pyvips.Image.black(1, 1, bands=3).copy(interpretation="srgb")
    data: bytes = black.icc_transform("cmyk", input_profile="srgb").get("icc-profile-data")
    return data


def make(out: Path) -> list[dict[str, Any]]:
    upright = picture()
    p3 = display_p3()
    cases: list[dict[str, Any]] = []

    def case(name: str, ext: str, reference: Image.Image, **facts: Any) -> Path:
        reference.save(out / f"{name}.ref.png")
        cases.append({"name": name, "file": f"{name}.{ext}", **facts})
        return out / f"{name}.{ext}"

    for orientation in range(1, 9):
        stored = upright.transpose(STORED[orientation]) if orientation in STORED else upright
        path = case(f"orient{orientation}", "jpg", upright, orientation=orientation, lossy=True)
        stored.save(path, quality=95, exif=exif(orientation))
        if orientation in (3, 6):  # the Pillow path (no shrink-on-load) turns them as well
            path = case(f"orient{orientation}-png", "png", upright, orientation=orientation)
            stored.save(path, exif=exif(orientation))
    upright.save(
        case("p3", "jpg", upright, icc=p3.hex(), lossy=True), quality=95, icc_profile=p3, exif=exif()
    )
    upright.save(case("p3-png", "png", upright, icc=p3.hex()), icc_profile=p3, exif=exif())
    cmyk = upright.convert("CMYK")
    cmyk.save(case("cmyk", "jpg", cmyk.convert("RGB"), lossy=True), quality=95)
    # A print-shop CMYK JPEG with its profile: upright means converted through that profile.
    press = ImageCms.ImageCmsProfile(io.BytesIO(swop_cmyk()))
    cmyk = ImageCms.profileToProfile(upright, ImageCms.createProfile("sRGB"), press, outputMode="CMYK")
    assert cmyk is not None
    seen = ImageCms.profileToProfile(cmyk, press, ImageCms.createProfile("sRGB"), outputMode="RGB")
    assert seen is not None
    cmyk.save(case("cmyk-icc", "jpg", seen, lossy=True), quality=95, icc_profile=swop_cmyk())
    ramp = Image.linear_gradient("L").resize(SIZE)
    sixteen = ramp.convert("I").point(lambda value: value * 257).convert("I;16")
    sixteen.save(case("gray16", "png", ramp.convert("RGB"), sixteen=True))
    floats = ramp.convert("F").point(lambda value: value / 255.0)
    floats.save(case("float", "tiff", ramp.convert("RGB"), float=True))
    alpha = Image.linear_gradient("L").rotate(90).resize(SIZE)
    la = Image.merge("LA", (upright.convert("L"), alpha))
    la.save(case("la", "png", la.convert("RGBA"), alpha=True))
    palette = upright.quantize(64)
    palette.info["transparency"] = palette.getpixel((SIZE[0] - 1, SIZE[1] - 1))
    palette.save(case("palette-trns", "png", palette.convert("RGBA"), alpha=True))
    bilevel = upright.convert("L").point(lambda value: 255 if value > 120 else 0).convert("1")
    bilevel.save(case("bilevel", "png", bilevel.convert("RGB")))
    frames = [Image.new("RGB", (120, 90), colour) for colour in QUADRANTS[:3]]
    for ext in ("gif", "webp"):
        path = case(f"anim-{ext}", ext, frames[0], frames=3, colours=QUADRANTS[:3])
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=[100, 200, 300], loop=0)
    heif = pillow_heif.from_pillow(upright)
    heif.save(out / "photo.heic", quality=90, exif=exif())
    with Image.open(out / "photo.heic") as decoded:
        case("photo", "heic", decoded.convert("RGB"), lossy=True)
    upright.save(out / "photo.avif", quality=90, exif=exif())
    with Image.open(out / "photo.avif") as decoded:
        case("photo-avif", "avif", decoded.convert("RGB"), lossy=True)
    (out / "photo-avif.avif").write_bytes((out / "photo.avif").read_bytes())
    (out / "photo.avif").unlink()
    # Sideways phone photos: pillow-heif stores the turn as HEIF's irot (decoded upright,
    # EXIF orientation reset to 1); Pillow's AVIF keeps the stored pixels and EXIF 6.
    sideways = upright.transpose(STORED[6])
    for name, ext in (("heic-orient6", "heic"), ("avif-orient6", "avif")):
        sideways.save(out / f"{name}.{ext}", quality=90, exif=exif(6))
        case(name, ext, upright, orientation=6, lossy=True)
    (out / "cases.json").write_text(json.dumps(cases, indent=1))
    return cases


if __name__ == "__main__":
    pillow_heif.register_heif_opener()
    make(Path(sys.argv[1]))
