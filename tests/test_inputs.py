"""Bad input gets one clear line naming the problem, from the library and from the CLI, and writes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavaseg.cli.main import main as cli_main
from llavaseg.errors import CheckpointMismatchError, InputError, LlavasegError
from llavaseg.images import load_image
from llavaseg.models.adapters import load_adapters, save_adapters
from llavaseg.models.components import new_adapters
from llavaseg.models.sam import FrozenSAM


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message and "Traceback" not in message
    return message


def test_missing_image_file(tiny_segmenter, tmp_path: Path):
    with pytest.raises(InputError) as info:
        tiny_segmenter(tmp_path / "missing.png", "the red thing")
    assert "image file not found" in _one_line(info.value) and "missing.png" in str(info.value)


def test_corrupt_image_file(tiny_segmenter, tmp_path: Path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(InputError) as info:
        tiny_segmenter(corrupt, "the red thing")
    assert "not a valid image" in _one_line(info.value) and "corrupt.png" in str(info.value)


@pytest.mark.parametrize("query", ["", "   \n", None])
def test_empty_or_non_string_query(tiny_segmenter, rgb_image, query):
    with pytest.raises(InputError) as info:
        tiny_segmenter(rgb_image, query)
    _one_line(info.value)


def test_mismatched_batch_lengths(tiny_segmenter, rgb_image):
    with pytest.raises(InputError, match="2 images but 3 queries"):
        tiny_segmenter([rgb_image, rgb_image], ["a", "b", "c"])


@pytest.mark.parametrize("array, fragment", [
    (np.zeros((0, 5, 3), np.uint8), "empty"),
    (np.zeros((4, 4, 5), np.uint8), "shape"),
    (np.full((4, 4, 3), np.nan), "NaN"),
])
def test_bad_arrays(array, fragment):
    with pytest.raises(InputError, match=fragment):
        load_image(array)


def test_image_forms_all_normalise_to_rgb(tmp_path: Path):
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0  # a transparent pixel composites on white
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert load_image(rgba)[1, 1].tolist() == [200, 0, 0]
    assert load_image(rgba)[0, 0].tolist() == [255, 255, 255]
    assert load_image(tmp_path / "grey.png")[2, 3].tolist() == [19, 19, 19]
    assert load_image(np.ones((3, 3), dtype=float)).max() == 255
    assert load_image(Image.fromarray(grey).convert("P")).shape == (6, 8, 3)


def test_template_with_unknown_placeholder_via_segmenter(tiny_segmenter, tmp_path: Path):
    from llavaseg import Segmenter
    from llavaseg.errors import TemplateError

    (tmp_path / "reason.txt").write_text("{query} {colour}")
    with pytest.raises(TemplateError) as info:
        Segmenter(tiny_segmenter.mllm, tiny_segmenter.sam, tiny_segmenter.text_encoder, tiny_segmenter.adapters,
                  prompts_dir=tmp_path)
    assert "reason.txt" in _one_line(info.value) and "{colour}" in str(info.value)


def test_adapters_for_a_different_sam_are_refused(tiny_segmenter, tmp_path: Path):
    other_sam = FrozenSAM.create("tiny", seed=123)  # same architecture, other weights
    adapters = new_adapters(other_sam, tiny_segmenter.text_encoder, dim=64, heads=4, scales=(4, 2, 1))
    save_adapters(adapters, tmp_path / "other")
    with pytest.raises(CheckpointMismatchError) as info:
        load_adapters(tmp_path / "other", sam_identity=tiny_segmenter.sam.identity(),
                      text_encoder_identity=tiny_segmenter.text_encoder.identity())
    assert "trained for SAM" in _one_line(info.value)


def test_sam_checkpoint_for_another_model_is_refused(tmp_path: Path):
    import torch

    wrong = FrozenSAM.create("tiny").sam.state_dict()
    torch.save(wrong, tmp_path / "tiny.pth")
    with pytest.raises(CheckpointMismatchError) as info:
        FrozenSAM.create("tiny-world", tmp_path / "tiny.pth")
    assert "is not a tiny-world checkpoint" in _one_line(info.value)


def test_cli_errors_are_one_line_and_write_nothing(tmp_path: Path, capsys, rgb_image):
    out = tmp_path / "mask.png"
    assert cli_main(["segment", str(tmp_path / "nope.jpg"), "the cat", "--out", str(out), "--preset", "tiny"]) == 2
    Image.fromarray(rgb_image).save(tmp_path / "ok.png")
    assert cli_main(["segment", str(tmp_path / "ok.png"), "  ", "--out", str(out), "--preset", "tiny"]) == 2
    assert cli_main(["segment", str(tmp_path / "ok.png"), "x", "--out", str(out), "--preset", "nope"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("llavaseg: error: ") for line in errors)
    assert "image file not found" in errors[0] and "query is empty" in errors[1] and "unknown preset" in errors[2]
    assert list(tmp_path.iterdir()) == [tmp_path / "ok.png"]


def test_all_user_errors_share_one_base_class():
    assert issubclass(InputError, LlavasegError) and issubclass(CheckpointMismatchError, LlavasegError)
