"""One image loader for API, CLI and benchmarks: orientation, bit depth, modes, and size guards."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llavaseg.errors import InputError
from llavaseg.images import MAX_PIXELS, image_size, load_image


def _phone_jpeg(path, width=40, height=20):
    """A 40x20 sensor image tagged 'rotate 90 clockwise' (EXIF 6), as phones save portrait photos: shown 20x40.
    The left half is red on the sensor, so after rotation the top half is red."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (230, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied(tmp_path):
    path = _phone_jpeg(tmp_path / "phone.jpg")
    array = load_image(path)
    assert array.shape == (40, 20, 3) and image_size(path) == (40, 20)
    assert array[:18].mean(axis=(0, 1))[0] > 150 and array[22:].mean(axis=(0, 1))[0] < 80  # upright: red on top


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    array = load_image(tmp_path / "deep.png")
    assert array.dtype == np.uint8 and array.shape == (8, 8, 3)
    assert array[0, 0, 0] == 0 and array[-1, -1, 0] == round(63000 / 257) and len(np.unique(array)) > 50
    floats = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    assert load_image(floats)[..., 0].tolist()[3][3] == 255 and load_image(floats)[0, 0, 0] == 0


@pytest.mark.parametrize("mode", ["P", "LA", "CMYK", "L", "I;16"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    image = Image.new("RGB", (6, 5), (10, 120, 200)).convert(mode) if mode != "I;16" else Image.new("I;16", (6, 5), 900)
    suffix = "jpg" if mode == "CMYK" else "png"
    image.save(tmp_path / f"x.{suffix}")
    array = load_image(tmp_path / f"x.{suffix}")
    assert array.shape == (5, 6, 3) and array.dtype == np.uint8


def test_size_guards_are_one_line(tmp_path):
    side = int(MAX_PIXELS ** 0.5) + 100
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")  # a few kB on disk, >100 megapixels decoded
    with pytest.raises(InputError, match="megapixels") as info:
        load_image(tmp_path / "bomb.png")
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="aspect ratio"):
        load_image(np.zeros((1, 200, 3), np.uint8))
    truncated = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(InputError, match="not a valid image"):
        load_image(truncated)


def test_phone_photo_gets_a_mask_of_the_displayed_size_everywhere(tmp_path, tiny_segmenter, capsys):
    """API, CLI and benchmark alike (the ground truth is drawn in the displayed image's coordinates)."""
    from llavaseg.cli.bench import main as bench_main
    from llavaseg.cli.main import main as segment_main

    photo = _phone_jpeg(tmp_path / "val" / "phone.jpg") if (tmp_path / "val").mkdir() is None else None
    assert tiny_segmenter(photo, "the red part").mask.shape == (40, 20)
    assert segment_main(["segment", str(photo), "the red part", "--preset", "tiny", "--out",
                         str(tmp_path / "m.png")]) == 0
    with Image.open(tmp_path / "m.png") as mask:
        assert mask.size == (20, 40)
    (tmp_path / "val" / "phone.json").write_text(json.dumps({
        "text": ["the red part"], "is_sentence": False,
        "shapes": [{"label": "target", "points": [[0, 0], [19, 0], [19, 19], [0, 19]]}]}))
    out = tmp_path / "bench"
    assert bench_main(["reasonseg", "--data", str(tmp_path), "--preset", "tiny", "--routes", "llavaseg",
                       "--no-dialogue", "--out", str(out)]) == 0
    record = json.loads((out / "queries-llavaseg.jsonl").read_text().splitlines()[0])
    assert record["error"] is None and record["mask"]["size"] == [40, 20]
