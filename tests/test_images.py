"""Safe image opening: good files, missing/corrupted/truncated files, decompression bombs."""

from __future__ import annotations

import pytest
from PIL import Image

from biformer.images import ImageError, open_image


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("RGB", (20, 10), (200, 10, 10)).save(path)
    return path


def test_opens_and_converts(png):
    image = open_image(png, mode="L")
    assert image.size == (20, 10) and image.mode == "L"


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "nope.png")


def test_not_an_image(tmp_path):
    path = tmp_path / "text.png"
    path.write_text("hello")
    with pytest.raises(ImageError, match="cannot read"):
        open_image(path)


def test_truncated_image(tmp_path):
    path = tmp_path / "big.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageError, match="cannot read"):
        open_image(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (4000, 3000)).save(path)  # small file, 12 megapixels
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(path, max_pixels=10_000_000)
    assert open_image(path, mode="L", max_pixels=None).size == (4000, 3000)
