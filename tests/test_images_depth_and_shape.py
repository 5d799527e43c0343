"""Images: an aspect-ratio limit (memory after resizing grows with it); 16-bit and float pixels by their range."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from biformer.images import ImageError, open_image


@pytest.mark.parametrize("size", [(600000, 1), (1, 200000), (10100, 100)])
def test_long_strips_are_refused_before_decoding(tmp_path, size):
    path = tmp_path / "strip.png"
    Image.new("L", size).save(path)
    with pytest.raises(ImageError, match=r"aspect ratio over the limit of 100:1"):
        open_image(path)
    assert open_image(path, max_aspect_ratio=None).size == size


def test_a_panorama_still_opens(tmp_path):
    path = tmp_path / "panorama.png"
    Image.new("RGB", (2000, 200)).save(path)
    assert open_image(path).size == (2000, 200)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    gradient = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(gradient).save(path)
    for mode in ("L", "RGB"):
        pixels = np.asarray(open_image(path, mode), dtype=np.float64)
        expected = np.round(gradient / 65535.0 * 255.0)
        np.testing.assert_array_equal(pixels if mode == "L" else pixels[..., 1], expected)
    assert (np.asarray(open_image(path, "L")) == 255).mean() < 0.01  # PIL's own convert: 99.6% white


def test_float_images_in_0_1_are_scaled_others_refused(tmp_path):
    values = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    path = tmp_path / "f.tif"
    Image.fromarray(values).save(path)
    np.testing.assert_array_equal(np.asarray(open_image(path, "L")), np.round(values.astype(np.float64) * 255))
    Image.fromarray(values * 1000).save(path)
    with pytest.raises(ImageError, match=r"floating-point pixels from 0 to 1000; expected the range \[0, 1\]"):
        open_image(path)
    Image.fromarray((values * 70000).astype(np.int32)).save(path)
    with pytest.raises(ImageError, match="32-bit integer pixels"):
        open_image(path)


def test_show_routing_refuses_a_strip_in_one_line(tmp_path, capsys):
    from biformer.cli import main

    strip = tmp_path / "strip.png"
    Image.new("RGB", (600000, 1)).save(strip)
    assert main(["show-routing", str(strip), "--point", "1,0", "-o", str(tmp_path / "r.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "aspect ratio over the limit" in err
