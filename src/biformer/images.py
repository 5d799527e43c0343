"""Opening image files safely: clear errors for unreadable files, a pixel limit against decompression bombs, an
aspect-ratio limit (a 600000 x 1 strip is small, but resized to a 224-pixel short side it is enormous), and
high-bit-depth images converted by their range instead of clipped."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["DEFAULT_MAX_ASPECT_RATIO", "DEFAULT_MAX_PIXELS", "ImageError", "open_image"]

# 89.5 megapixels is PIL's own warning threshold; a 9000 x 9000 photo still opens.
DEFAULT_MAX_PIXELS = 89_478_485
# Long side over short side. Panoramas are about 10:1; memory after resizing grows with this ratio.
DEFAULT_MAX_ASPECT_RATIO = 100
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageError(ValueError):
    """An image file that cannot be used: missing, unreadable, corrupted, or over the pixel limit."""


def _to_eight_bits(image: Image.Image, path: Path) -> Image.Image:
    """16-bit and float images as 8-bit ``L`` by their range (PIL's ``convert`` would clip them to 255)."""
    if image.mode in _SIXTEEN_BIT_MODES:  # 0..65535
        pixels = np.asarray(image, dtype=np.float64) / 65535.0
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high) and 0.0 <= low and high <= 1.0):
            raise ImageError(f"image: {path} has floating-point pixels from {low:g} to {high:g}; expected the range "
                             f"[0, 1] (convert it to 8-bit, or to floats in [0, 1])")
    else:  # "I": 32-bit integers have no declared range
        raise ImageError(f"image: {path} has 32-bit integer pixels, whose range is unknown; convert it to 8- or "
                         f"16-bit first")
    return Image.fromarray(np.round(pixels * 255.0).astype(np.uint8), mode="L")


def open_image(path: str | os.PathLike, mode: str = "RGB", max_pixels: int | None = DEFAULT_MAX_PIXELS,
               max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO) -> Image.Image:
    """Open ``path`` fully decoded in ``mode``.

    The pixel count is checked from the header before anything is decoded, so a small file claiming a huge
    size (a decompression bomb) is refused without allocating it; so is an image longer than
    ``max_aspect_ratio`` times its width or wider than that times its height. 16-bit images are scaled from
    0..65535 and float images from [0, 1] to 8 bits (floats outside [0, 1] and 32-bit integers are refused).

    Args:
        path: image file.
        mode: PIL mode to convert to (``"RGB"``, ``"L"``, ...).
        max_pixels: refuse images with more pixels than this; ``None`` disables the limit.
        max_aspect_ratio: refuse images whose long side exceeds this many times the short side; ``None``
            disables the limit.

    Raises:
        ImageError: (a ``ValueError``) naming the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image: no such file: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageError(
                        f"image: {path} has {width}x{height} = {width * height} pixels, over the limit of "
                        f"{max_pixels} (refused as a possible decompression bomb; raise max_pixels to allow it)"
                    )
                if max_aspect_ratio is not None and max(width, height) > max_aspect_ratio * max(min(width, height), 1):
                    raise ImageError(
                        f"image: {path} is {width}x{height} pixels, an aspect ratio over the limit of "
                        f"{max_aspect_ratio:g}:1 (resized to the model's input its long side would be huge; crop it "
                        f"or raise max_aspect_ratio)"
                    )
                if image.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
                    return _to_eight_bits(image, path).convert(mode)
                return image.convert(mode)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"image: cannot read {path} ({type(error).__name__}: {error})") from error
