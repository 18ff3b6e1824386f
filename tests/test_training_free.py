"""Training-free route: proposal de-duplication, scoring, the union rule, and the route on the ``tiny`` preset."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from llavaseg.errors import InputError
from llavaseg.routes import training_free as tf
from llavaseg.routes.training_free import (
    Proposals,
    TrainingFreeOptions,
    combined_scores,
    dedupe_masks,
    mask_iou_matrix,
    point_grid,
    select_masks,
    wants_several,
)
from llavaseg.views import VIEW_FILL, proposal_view


def _square(y0: int, x0: int, side: int, size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[y0: y0 + side, x0: x0 + side] = True
    return mask


def test_mask_iou_matrix_hand_numbers():
    a = _square(0, 0, 10)  # 100 px
    b = _square(0, 1, 10)  # shifted one column: 90 shared, union 110
    c = _square(20, 20, 5)  # disjoint
    ious = mask_iou_matrix(np.stack([a, b, c]))
    assert ious[0, 0] == pytest.approx(1.0)
    assert ious[0, 1] == pytest.approx(90 / 110)
    assert ious[0, 2] == 0.0
    empty = np.zeros((1, 32, 32), bool)
    assert mask_iou_matrix(empty)[0, 0] == 0.0


def test_dedupe_drops_near_duplicates_of_better_masks():
    a, b, c = _square(0, 0, 10), _square(0, 1, 10), _square(20, 20, 5)
    masks = np.stack([a, b, c])
    scores = np.array([0.5, 0.9, 0.7])
    # b is best; a overlaps it by 0.818 > 0.7 and goes; c is disjoint and stays.
    assert dedupe_masks(masks, scores, 0.7).tolist() == [1, 2]
    # A looser threshold keeps all three, best first.
    assert dedupe_masks(masks, scores, 0.9).tolist() == [1, 2, 0]
    assert dedupe_masks(np.zeros((0, 32, 32), bool), np.zeros(0), 0.7).tolist() == []


def test_select_masks_union_rule():
    scores = np.array([0.2, 0.9, 0.85, 0.1, 0.5])
    assert select_masks(scores, False, 0.5).tolist() == [1]
    # median 0.5, best 0.9: cut = 0.9 - 0.5 * 0.4 = 0.7 -> indices 1 and 2, best first
    assert select_masks(scores, True, 0.5).tolist() == [1, 2]
    # threshold 1.0: everything at or above the median
    assert select_masks(scores, True, 1.0).tolist() == [1, 2, 4]
    assert select_masks(np.zeros(0), True, 0.5).tolist() == []


def test_wants_several():
    assert wants_several("segment all the red circles", "red circles")
    assert wants_several("where is every square?", "square")
    assert wants_several("the shapes on the left", "blue squares")
    # plural only as context in the query; the description names one target
    assert not wants_several("the shape whose colour is the one most shapes share", "circle")
    assert not wants_several("the glass on the table", "glass")
    assert not wants_several("the red circle", "circle")


def test_combined_scores_weighted_mean_of_cosines():
    views = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    phrases = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # view 0 cosines: 1, 0.6, 0 ; view 1: 0, 0.8, 1
    equal = combined_scores(views, phrases, np.array([1.0, 1.0, 1.0]))
    assert equal.tolist() == pytest.approx([1.6 / 3, 1.8 / 3])
    weighted = combined_scores(views, phrases, np.array([2.0, 1.0, 1.0]))
    assert weighted.tolist() == pytest.approx([2.6 / 4, 1.8 / 4])


def test_point_grid_cell_centres():
    grid = point_grid(20, 40, 2)
    assert grid.tolist() == [[10, 5], [30, 5], [10, 15], [30, 15]]


def test_proposal_view_frame_and_box():
    image = np.full((8, 8, 3), 200, np.uint8)
    image[2:4, 5:7] = (255, 0, 0)
    mask = np.zeros((8, 8), bool)
    mask[2:4, 5:7] = True
    frame = proposal_view(image, mask, "frame")
    assert frame.shape == (8, 8, 3)
    assert (frame[mask] == (255, 0, 0)).all() and (frame[~mask] == VIEW_FILL).all()
    box = proposal_view(image, mask, "box", margin=0.5)  # 2x2 object grown to a 4x4 square (min half-side 4 -> 8)
    assert box.shape == (8, 8, 3)
    assert (box == (255, 0, 0)).all(axis=-1).sum() == 4
    wide = proposal_view(np.zeros((4, 8, 3), np.uint8), np.ones((4, 8), bool), "frame")
    assert wide.shape == (8, 8, 3) and (wide[:2] == VIEW_FILL).all() and (wide[2:6] == 0).all()
    with pytest.raises(InputError):
        proposal_view(image, mask, "crop")


def test_options_from_context_validates_and_ignores_foreign_keys():
    opts = TrainingFreeOptions.from_context({"grid": 4, "seg_token_model": "/x"})
    assert opts.grid == 4
    with pytest.raises(InputError):
        TrainingFreeOptions.from_context({"view": "crop"})
    with pytest.raises(InputError):
        TrainingFreeOptions.from_context({"grid": 0})


# ------------------------------------------------------------------------------------------------ the route


def _fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def route_segmenter(tiny_segmenter):
    return tiny_segmenter.with_route("training-free", grid=4, min_iou=0.0)


def test_route_returns_masks_at_image_size_and_leaves_models_frozen(route_segmenter, rgb_image):
    parts = route_segmenter.context.components
    models = {"mllm": parts.mllm.model, "sam": parts.sam.sam, "clip": parts.text_encoder.model}
    before = {name: _fingerprint(m) for name, m in models.items()}
    results = route_segmenter([rgb_image, rgb_image[:64, :100]], ["the red circle", "all the blue squares"])
    assert [r.mask.shape for r in results] == [(90, 140), (64, 100)]
    for result in results:
        assert result.route == "training-free" and result.mask.dtype == bool
        assert {"sam_proposals", "clip_scoring", "mllm_reason", "mllm_attributes"} <= set(result.timings)
        assert "proposals" in result.raw_outputs and "reason" in result.raw_outputs
    assert '"several": true' in results[1].raw_outputs["proposals"]
    assert {name: _fingerprint(m) for name, m in models.items()} == before
    assert all(not p.requires_grad for m in models.values() for p in m.parameters())
    assert route_segmenter.route.dialogue_model() is parts.mllm


def test_route_union_of_chosen_proposals(route_segmenter, rgb_image, monkeypatch):
    """With hand-made proposals, 'never' returns exactly one of them and 'always' the union of the best ones."""
    image = rgb_image[:32, :32].copy()
    masks = np.stack([_square(0, 0, 8), _square(0, 16, 8), _square(16, 0, 8), _square(16, 16, 8)])
    fake = Proposals(masks=masks, sam_iou=np.ones(4, np.float32), points=np.zeros((4, 2), np.float32))
    monkeypatch.setattr(tf, "propose_masks", lambda sam, img, opts: fake)
    route = route_segmenter.route
    stages = tf.run_stages(route.mllm, route.prompts, [image], ["the red circle"])
    single = tf.TrainingFreeRoute(route.mllm, route.sam, route.clip, route.prompts, with_answer=False,
                                  options=TrainingFreeOptions(multi="never"))
    one = single.segment_with_stages([image], ["q"], stages)[0]
    assert any((one.mask == m).all() for m in masks)
    several = tf.TrainingFreeRoute(route.mllm, route.sam, route.clip, route.prompts, with_answer=False,
                                   options=TrainingFreeOptions(multi="always", relative_threshold=1.0))
    union = several.segment_with_stages([image], ["q"], stages)[0]
    # relative_threshold 1 keeps every proposal scoring at least the median: two or more of the four squares
    covered = [bool((union.mask & m).any()) for m in masks]
    assert sum(covered) >= 2
    assert (union.mask == masks[np.array(covered)].any(axis=0)).all()
    assert union.mask[one.mask].all()  # the single best proposal is part of the union
    assert union.score == pytest.approx(one.score)


def test_preset_route_defaults_apply_and_caller_options_win(tiny_segmenter):
    from llavaseg.models.presets import get_preset
    from llavaseg.routes.registry import RouteContext, build_route

    tiny_world = get_preset("tiny-world")
    assert tiny_world.route_defaults["training-free"] == {"grid": 6}  # chosen on tiny-world train (docs/tinyworld.md)
    parts = tiny_segmenter.context.components
    context = RouteContext(components=parts, prompts=tiny_segmenter.context.prompts, preset=tiny_world)
    assert build_route("training-free", context).options.grid == 6
    context.options = {"grid": 3}
    assert build_route("training-free", context).options.grid == 3
    plain = RouteContext(components=parts, prompts=tiny_segmenter.context.prompts, preset=get_preset("tiny"))
    assert build_route("training-free", plain).options.grid == 16
    # the tiny world's attribute values reach llavaseg-verify's constrained decoding the same way
    from llavaseg.tinyworld.vocab import ATTRIBUTE_VALUES

    assert tiny_world.route_defaults["llavaseg-verify"]["attribute_schema"]["color"] == list(ATTRIBUTE_VALUES["color"])
    assert build_route("llavaseg-verify", RouteContext(components=parts, prompts=context.prompts,
                                                       preset=tiny_world)).constraint is not None
    assert build_route("llavaseg-verify", plain).constraint is None
