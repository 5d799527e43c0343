"""Opening image files safely: clear errors for unreadable files and a pixel limit against decompression bombs."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image

__all__ = ["DEFAULT_MAX_PIXELS", "ImageError", "open_image"]

# 89.5 megapixels is PIL's own warning threshold; a 9000 x 9000 photo still opens.
DEFAULT_MAX_PIXELS = 89_478_485


class ImageError(ValueError):
    """An image file that cannot be used: missing, unreadable, corrupted, or over the pixel limit."""


def open_image(path: str | os.PathLike, mode: str = "RGB", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` fully decoded in ``mode``.

    The pixel count is checked from the header before anything is decoded, so a small file claiming a huge
    size (a decompression bomb) is refused without allocating it.

    Args:
        path: image file.
        mode: PIL mode to convert to (``"RGB"``, ``"L"``, ...).
        max_pixels: refuse images with more pixels than this; ``None`` disables the limit.

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
                return image.convert(mode)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"image: cannot read {path} ({type(error).__name__}: {error})") from error
