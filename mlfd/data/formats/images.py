"""Image files: header checks (pixel limits, modes) and decoding to uint8, as DALI reads them."""

from __future__ import annotations

import os
import re

import numpy as np

from mlfd.errors import MlfdError

# PIL's own default (Image.MAX_IMAGE_PIXELS, about 89.5 Mpx): a PNG of a few hundred KiB
# can declare 20000x20000 pixels and ask for gigabytes once decoded. Images above the limit
# are refused from their header, before any decoding.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# Set per command by the CLI (--max-image-pixels, --drop-empty-classes); read where image
# folders are listed and images decoded.
_POLICY = {"max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS, "drop_empty_classes": False}


def set_image_policy(max_image_pixels: int | None = None, drop_empty_classes: bool = False) -> None:
    if max_image_pixels is not None and max_image_pixels < 1:
        raise MlfdError(f"--max-image-pixels must be >= 1, got {max_image_pixels}")
    _POLICY["max_image_pixels"] = max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS
    _POLICY["drop_empty_classes"] = bool(drop_empty_classes)


def max_image_pixels() -> int:
    return _POLICY["max_image_pixels"]


def drop_empty_classes() -> bool:
    return _POLICY["drop_empty_classes"]


class BadImage(MlfdError):
    """An image file of a dataset that cannot be used; ``reason`` is one short phrase
    (empty file, truncated, not an image, ...)."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        # one argument: the whole message (how a DataLoader worker's error is rebuilt)
        super().__init__(f"bad image {path}: {reason}" if reason is not None else str(path))
        self.path, self.reason = str(path), reason


# 16-bit samples are brought to 8 bits as round(v / 257), which is what DALI's decoder does.
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
GRAY_MODES = frozenset({"1", "L", *_SIXTEEN_BIT})  # decoded to one channel
# Modes both pipelines decode alike (checked against DALI's CPU decoder); others, such as
# 32-bit integer or float pixels, have no agreed 8-bit reading.
_MODES = GRAY_MODES | {"LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}


def _over_limit(pixels: int, limit: int, dims: str = "") -> str:
    return f"over the pixel limit: {dims}{pixels:,} pixels > {limit:,} (see --max-image-pixels)"


def check_pixels(path: str | os.PathLike, width: int, height: int, limit: int | None = None):
    """Refuse an image whose header declares more than ``limit`` pixels."""
    limit = limit or max_image_pixels()
    if width * height > limit:
        raise BadImage(path, _over_limit(width * height, limit, f"{width}x{height} = "))


_PIL_QUIET: list[bool] = []


def _pil(limit: int):
    """PIL, with its own decompression-bomb check kept out of the way of ours: it only ever
    fires above our limit (raised to at least ours), where we refuse anyway, and its
    warning would be a second line beside our one error line."""
    import warnings

    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit
    if not _PIL_QUIET:  # once per process (DataLoader workers included)
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _PIL_QUIET.append(True)
    return Image


def _decode_failure(path, exc: BaseException) -> BadImage:
    text = str(exc) or exc.__class__.__name__
    if "truncat" in text.lower():
        return BadImage(path, "truncated")
    return BadImage(path, f"undecodable ({exc.__class__.__name__}: {text})")


class open_image:  # noqa: N801 - used as a context manager, like open()
    """``with open_image(path) as im``: the PIL image with only its header read, refused
    (:class:`BadImage`) when empty, not an image, over the pixel limit or of a mode the
    pipelines do not read alike."""

    def __init__(self, path: str | os.PathLike, limit: int | None = None):
        self.path, self.limit = path, limit or max_image_pixels()

    def __enter__(self):
        Image = _pil(self.limit)  # noqa: N806
        from PIL import UnidentifiedImageError

        path = self.path
        try:
            if isinstance(path, (str, os.PathLike)) and os.stat(path).st_size == 0:
                raise BadImage(path, "empty file")
            self.im = Image.open(path)
        except BadImage:
            raise
        except Image.DecompressionBombError as exc:  # PIL's check: twice its limit, >= ours
            found = re.search(r"\((\d+) pixels\)", str(exc))
            raise BadImage(path, _over_limit(int(found.group(1)), self.limit) if found
                           else f"over the pixel limit: {exc}") from None
        except UnidentifiedImageError:
            raise BadImage(path, "not an image") from None
        except FileNotFoundError:
            raise BadImage(path, "file not found") from None
        except OSError as exc:
            if exc.errno is not None and exc.strerror:  # the file system's: "is a directory"
                raise BadImage(path, exc.strerror.lower()) from None
            raise _decode_failure(path, exc) from None
        except Exception as exc:  # a malformed header can fail in many ways
            raise _decode_failure(path, exc) from None
        try:
            check_pixels(path, self.im.width, self.im.height, self.limit)
            if self.im.mode not in _MODES:
                raise BadImage(path, f"wrong mode ({self.im.mode} pixels)")
        except BaseException:
            self.im.close()
            raise
        return self.im

    def __exit__(self, *exc) -> None:
        self.im.close()


def image_header(path: str | os.PathLike, limit: int | None = None) -> tuple[int, tuple]:
    """(channels, (height, width)) from the header: 1 channel for grayscale, else 3."""
    with open_image(path, limit) as im:
        return (1 if im.mode in GRAY_MODES else 3), (im.height, im.width)


def read_image(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """Decode one file to uint8 (H, W, C), C 1 for grayscale and 3 otherwise (alpha
    dropped), as DALI's decoder reads it; any failure is a :class:`BadImage` naming it."""
    with open_image(path, limit) as im:
        try:
            arr = _pixels(im, path)
        except BadImage:
            raise
        except Exception as exc:  # decoding an untrusted file can fail in many ways
            raise _decode_failure(path, exc) from None
        if arr.shape[:2] != (im.height, im.width):
            raise BadImage(path, f"unexpected size (decoded {arr.shape[1]}x{arr.shape[0]}, "
                                 f"header {im.width}x{im.height})")
    return arr


def _to_8bit(wide: np.ndarray) -> np.ndarray:
    return ((wide.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257), no ties


def _pixels(im, path) -> np.ndarray:
    if im.mode in _SIXTEEN_BIT:  # PIL's convert("L") would clip these at 255
        return _to_8bit(np.asarray(im))[:, :, None]
    if im.mode in GRAY_MODES:
        return np.array(im.convert("L"))[:, :, None]  # writable: torch warns on read-only
    wide = _png16_colour(im, path)
    if wide is not None:
        return _to_8bit(wide[:, :, :3])
    return np.array(im.convert("RGB"))


def _png16_colour(im, path) -> np.ndarray | None:
    """The 16-bit samples of a 16-bit colour PNG, or None. PIL keeps only each sample's
    high byte (v >> 8, up to one level below DALI's round(v / 257)); decoding the file a
    second time with the little-endian raw mode of the same layout yields the low bytes."""
    tile = im.tile
    raw = tile[0][3] if im.format == "PNG" and len(tile) == 1 else None
    if not isinstance(raw, str) or not raw.endswith(";16B"):
        return None
    high = np.asarray(im)
    Image = _pil(max_image_pixels())  # noqa: N806
    with Image.open(path) as again:
        first = again.tile[0]
        low_mode = raw[:-1] + "L"
        again.tile = [first._replace(args=low_mode) if hasattr(first, "_replace")
                      else (*first[:3], low_mode)]
        try:
            again.load()
        except ValueError:  # no such raw mode (16-bit gray + alpha): the high bytes it is
            return None
        low = np.asarray(again)
    return (high.astype(np.uint16) << 8) | low
