"""Compressed message bodies inflated with a bound: a compression bomb is refused, never inflated.

kombu inflates a body whose ``compression`` header is set with the codec's one-shot
``decompress`` (``kombu.compression``): a 3 KB bz2 body that holds 3 GiB of zeros
allocates 3 GiB in the consumer, and the worker is OOM-killed, takes the message
again after its restart, and dies again. :func:`inflate` reads the same formats
incrementally (``decompressobj`` with ``max_length``) and raises
:class:`InflateRefused` as soon as the output would pass ``limit`` bytes; the
channel dead-letters such a message (see :mod:`transports.sqlite`).

Decided:

* The formats are kombu's own names and aliases for zlib (``application/x-gzip``,
  ``gzip``, ``zlib``: zlib-wrapped deflate, as kombu writes it), bz2 and lzma (both
  multi-stream, as their ``decompress`` functions are). Whatever kombu registers
  beyond these (brotli, zstd when installed) is refused rather than inflated
  unbounded: a bomb is one codec away otherwise.
* A truncated or corrupt stream is refused too (kombu would fail on it as well).
* Memory: at most ``limit`` + one :data:`WINDOW` of output at any time, never more.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable
from typing import Protocol

#: Bytes of inflated body a message may have when no ``max_inflated_bytes`` is given (64 MiB).
DEFAULT_MAX_INFLATED_BYTES = 64 * 1024 * 1024
#: Bytes inflated per decompressor call (the output is collected a window at a time).
WINDOW = 1024 * 1024


class InflateRefused(ValueError):
    """Raised when a compressed body would inflate past the bound, or cannot be inflated safely."""


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


class _Zlib:
    """zlib's ``decompressobj`` behind the interface bz2's and lzma's decompressors share."""

    def __init__(self) -> None:
        self._inflater = zlib.decompressobj()
        self._pending = b""

    @property
    def eof(self) -> bool:
        return self._inflater.eof

    @property
    def unused_data(self) -> bytes:
        return self._inflater.unused_data

    def decompress(self, data: bytes, max_length: int = -1, /) -> bytes:
        # zlib keeps unread input in unconsumed_tail instead of buffering it like bz2/lzma.
        # max_length is always at least 1 here (0 would mean "no bound" to zlib).
        out = self._inflater.decompress(self._pending + data, max_length)
        self._pending = self._inflater.unconsumed_tail
        return out


_Codec = tuple[str, Callable[[], _Decompressor]]
_ZLIB: _Codec = ("zlib", _Zlib)
_BZ2: _Codec = ("bz2", bz2.BZ2Decompressor)
_LZMA: _Codec = ("lzma", lzma.LZMADecompressor)
#: kombu's compression names (content types and aliases) -> the codec's name and a decompressor.
_DECOMPRESSORS: dict[str, _Codec] = {
    **dict.fromkeys(("application/x-gzip", "gzip", "zlib"), _ZLIB),
    **dict.fromkeys(("application/x-bz2", "bzip2", "bzip"), _BZ2),
    **dict.fromkeys(("application/x-lzma", "lzma", "xz"), _LZMA),
}


def inflate(body: bytes, compression: str, limit: int) -> bytes:
    """``body`` inflated as ``compression`` says, or :class:`InflateRefused` past ``limit`` bytes."""
    codec = _DECOMPRESSORS.get(compression)
    if codec is None:
        known = sorted({name for name, _ in _DECOMPRESSORS.values()})
        raise InflateRefused(
            f"compression {compression!r} cannot be inflated with a bound here; send it with"
            f" one of {', '.join(known)}, or uncompressed"
        )
    name, make = codec
    out = bytearray()
    data, first = body, True
    while True:
        try:
            data = _inflate_stream(make(), data, out, limit)
        except EOFError:
            raise InflateRefused(f"its {name} body ({len(body)} bytes) is truncated") from None
        except (zlib.error, OSError, lzma.LZMAError) as exc:
            if first:
                raise InflateRefused(f"its {name} body ({len(body)} bytes) is corrupt: {exc}") from None
            # As bz2/lzma.decompress: what follows the last whole stream is not a stream; ignored.
            return bytes(out)
        first = False
        if len(out) > limit:
            raise InflateRefused(
                f"its {name} body ({len(body)} bytes) inflates past max_inflated_bytes={limit}"
                " (a compression bomb?) and was not inflated further; if bodies this large are"
                " expected, raise the broker transport option max_inflated_bytes"
            )
        if not data or name == "zlib":
            # zlib.decompress ignores what follows its stream; bz2 and lzma read on (multi-stream).
            return bytes(out)


def _inflate_stream(decompressor: _Decompressor, data: bytes, out: bytearray, limit: int) -> bytes:
    """Inflate one stream of ``data`` into ``out`` up to ``limit`` + 1 bytes; returns what follows it."""
    # One byte past the bound is how "more than limit" shows without reading further;
    # a window at a time, so no chunk is held beside ``out`` for long.
    out += decompressor.decompress(data, min(WINDOW, limit + 1 - len(out)))
    while len(out) <= limit and not decompressor.eof:
        chunk = decompressor.decompress(b"", min(WINDOW, limit + 1 - len(out)))
        if not chunk:
            raise EOFError("the stream is truncated")
        out += chunk
    return b"" if len(out) > limit else decompressor.unused_data
