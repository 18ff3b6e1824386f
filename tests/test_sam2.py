"""SAM 2.1 as a second frozen segmenter: a tiny random model of transformers' real Sam2Model classes, saved in
the real layout (save_pretrained folder + preprocessor config), driven through the same interface as SAM 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llavaseg.errors import CheckpointMismatchError, InputError
from llavaseg.method.segment import adapter_mask_logits
from llavaseg.models.components import build_sam, build_text_encoder, check_spec, new_adapters
from llavaseg.models.presets import PRESETS
from llavaseg.train import adapter_train_step


@pytest.fixture(scope="module")
def sam2_folder(tmp_path_factory):
    from transformers import Sam2ImageProcessor, Sam2Model

    from llavaseg.models.sam2 import tiny_sam2_config

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sam2") / "sam2.1-hiera-tiny-random"
    Sam2Model(tiny_sam2_config()).save_pretrained(folder)
    Sam2ImageProcessor(size={"height": 128, "width": 128}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sam2(sam2_folder):
    torch.set_num_threads(1)
    return build_sam(str(sam2_folder), device="cpu")


def _image(seed: int = 0, shape=(48, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)


def test_a_saved_sam2_folder_loads_as_sam2(sam2, sam2_folder) -> None:
    from transformers import Sam2Model

    assert type(sam2.model) is Sam2Model and sam2.family == "sam2"
    assert sam2.identity()["family"] == "sam2" and sam2.name == sam2_folder.name
    check_spec(PRESETS["tiny"].spec().with_sources(sam=str(sam2_folder)), allow_untrained=True)
    features = sam2.encode(_image())
    # hierarchical levels at strides 4 and 8 (projected as the decoder projects them), embedding at stride 16
    assert features.embedding.shape == (1, 32, 8, 8)
    assert [tuple(level.shape) for level in features.levels] == [(1, 4, 32, 32), (1, 8, 16, 16)]
    assert features.original_size == (48, 64) and features.input_size == (128, 128)


def test_points_and_boxes_give_masks_of_the_image_size(sam2) -> None:
    image = _image(shape=(40, 70))
    masks, iou = sam2.predict_points(image, np.array([[[10.0, 10.0]], [[50.0, 20.0]]]), np.ones((2, 1)))
    assert masks.shape == (2, 3, 40, 70) and iou.shape == (2, 3) and masks.dtype == bool
    masks, iou = sam2.predict_boxes(image, np.array([[5, 5, 30, 30], [20, 10, 60, 35]]))
    assert masks.shape == (2, 1, 40, 70) and iou.shape == (2, 1)


def test_decode_equals_transformers_own_forward(sam2) -> None:
    """Our decode of box prompts against cached features == Sam2Model.forward on the same pixels."""
    image = _image(3)
    features = sam2.encode(image)
    box = torch.tensor([[[10.0, 12.0, 90.0, 100.0]]])  # in the 128 px input frame
    sparse, dense = sam2.model.prompt_encoder(input_points=None, input_labels=None, input_boxes=box, input_masks=None)
    ours, our_iou = sam2.decode(features, sparse[0], dense, multimask_output=True)
    with torch.no_grad():
        theirs = sam2.model(pixel_values=sam2.preprocess([image]), input_boxes=box, multimask_output=True)
    assert torch.allclose(ours, theirs.pred_masks[:, 0], atol=1e-5)
    assert torch.allclose(our_iou, theirs.iou_scores[:, 0], atol=1e-5)


def test_adapters_learn_on_sam2_features_and_sam2_stays_frozen(sam2) -> None:
    text_encoder = build_text_encoder("tiny-clip", None, device="cpu")
    adapters = new_adapters(sam2, text_encoder, dim=32, heads=4, scales=(4, 2, 1), seed=0)
    assert adapters.config.level_dims == (4, 8) and adapters.config.sam_identity["family"] == "sam2"
    before = {k: p.detach().clone() for k, p in sam2.model.named_parameters()}
    images = [_image(seed) for seed in range(2)]
    masks = [np.zeros((48, 64), np.uint8) for _ in images]
    masks[0][10:30, 5:25] = 1
    masks[1][20:44, 30:60] = 1
    features = sam2.encode_batch(images)
    texts = [text_encoder.encode_text([phrase, "color: red"]) for phrase in ("the left square", "the right one")]
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-2)
    losses = [adapter_train_step(adapters, sam2, optimizer, features, texts, masks)[0] for _ in range(25)]
    # measured: about 1.78 -> 1.52 (the random tiny SAM 2 bounds how far the adapters alone can go)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    for key, parameter in sam2.model.named_parameters():
        assert parameter.grad is None and not parameter.requires_grad, key
        assert torch.equal(parameter, before[key]), f"{key} changed"
    assert not sam2.model.training


def test_adapters_never_meet_another_segmenter(sam2, tmp_path) -> None:
    from llavaseg.models.adapters import load_adapters, save_adapters

    text_encoder = build_text_encoder("tiny-clip", None, device="cpu")
    sam1 = build_sam("random:tiny", device="cpu")
    save_adapters(new_adapters(sam2, text_encoder, dim=32, heads=4, scales=(4, 2, 1)), tmp_path / "for-sam2")
    save_adapters(new_adapters(sam1, text_encoder, dim=32, heads=4, scales=(4, 2, 1)), tmp_path / "for-sam1")
    assert "level_dims" not in json.loads((tmp_path / "for-sam1" / "config.json").read_text())  # SAM 1 files as before
    with pytest.raises(CheckpointMismatchError, match="trained for SAM"):
        load_adapters(tmp_path / "for-sam2", sam_identity=sam1.identity())
    with pytest.raises(CheckpointMismatchError, match="trained for SAM"):
        load_adapters(tmp_path / "for-sam1", sam_identity=sam2.identity())
    loaded = load_adapters(tmp_path / "for-sam2", sam_identity=sam2.identity())
    features = sam2.encode(_image())
    text = text_encoder.encode_text(["x"]).clone()[None]
    low, _ = adapter_mask_logits(loaded, sam2, [features], text, torch.ones(1, 1, dtype=torch.bool))
    assert low.shape[-2:] == (32, 32)


def test_a_sam2_package_checkpoint_is_refused_in_one_line(tmp_path) -> None:
    (tmp_path / "sam2.1_hiera_tiny.pt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises((InputError, CheckpointMismatchError)):
        build_sam(str(tmp_path / "sam2.1_hiera_tiny.pt"), device="cpu")
