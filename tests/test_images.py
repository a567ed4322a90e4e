"""Image decoding: every mode becomes 8-bit RGB; broken and oversized files are refused with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from spurgen.images import UnreadableImage, load_rgb


def _save(tmp_path, name, image, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "RGB"])
def test_every_mode_converts_to_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.full((8, 8, 3), (200, 40, 90), np.uint8), "RGB")
    image = rgb.convert(mode)
    path = _save(tmp_path, f"x.{'jpg' if mode == 'CMYK' else 'png'}", image)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and loaded.size == (8, 8)


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    array = np.full((4, 4), 32768, np.uint16)  # mid-grey in 16 bits
    path = _save(tmp_path, "grey16.png", Image.fromarray(array))
    pixel = np.asarray(load_rgb(path))[0, 0]
    assert tuple(pixel) == (128, 128, 128)


def test_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert tuple(np.asarray(load_rgb(_save(tmp_path, "t.png", image)))[0, 0]) == (255, 255, 255)


def test_animation_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert np.asarray(load_rgb(path))[0, 0, 0] > 200


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"GIF89a garbage", "cannot identify"),
])
def test_broken_files_are_refused_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(UnreadableImage, match=reason):
        load_rgb(path)


def test_truncated_file_is_refused(tmp_path):
    path = _save(
        tmp_path, "full.png", Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    )
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UnreadableImage):
        load_rgb(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = _save(tmp_path, "big.png", Image.new("L", (4000, 4000)))
    with pytest.raises(UnreadableImage, match="more than the 1000000 allowed"):
        load_rgb(path, max_pixels=1_000_000)
