"""The shipped tiny-world open_clip model, and the pieces of its training recipe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llavaseg.recipes.train_clip import (
    BACKGROUND,
    WEIGHTS_DIR,
    ScenePool,
    caption_for,
    caption_matches,
    load_tiny_world_clip,
    multi_positive_clip_loss,
    object_view,
)
from llavaseg.tinyworld.vocab import COLORS


@pytest.fixture(scope="module")
def clip():
    return load_tiny_world_clip()


def test_shipped_weights_load_strictly_and_frozen(clip):
    stored = load_file(str(WEIGHTS_DIR / "open_clip_model.safetensors"))
    state = clip.model.state_dict()
    assert set(stored) == set(state)
    for key in ("token_embedding.weight", "text_projection", "visual.attnpool.positional_embedding", "logit_scale"):
        assert torch.equal(state[key], stored[key].float()), key
    assert all(not p.requires_grad for p in clip.model.parameters())
    assert not clip.model.training
    assert clip.dim == 64


def test_colour_of_val_objects_by_nearest_phrase(clip):
    pool = ScenePool.build(6, 0, stream="val", progress=False)
    objects = pool.objects[:20]
    assert len(objects) == 20
    views = [object_view(pool.images[s], pool.labels[s] == k) for s, k, _ in objects]
    sims = clip.encode_images(views) @ clip.encode_text([f"color: {c}" for c in COLORS]).T
    predicted = [COLORS[i] for i in sims.argmax(dim=1).tolist()]
    accuracy = np.mean([p == a["color"] for p, (_, _, a) in zip(predicted, objects)])
    assert accuracy >= 0.9


def test_attribute_phrases_are_separated(clip):
    text = clip.encode_text([f"color: {c}" for c in COLORS])
    cos = text @ text.T
    off_diagonal = cos[~torch.eye(len(COLORS), dtype=torch.bool)]
    assert float(off_diagonal.max()) < 0.9


def test_captions_state_only_true_attributes():
    attrs = {"color": "red", "shape": "circle", "size": "large", "location": "top left"}
    other = {**attrs, "color": "blue"}
    for seed in range(200):
        text, constraints = caption_for(attrs, np.random.default_rng(seed))
        assert caption_matches(constraints, attrs)
        assert all(value in text for value in constraints.values())
        assert caption_matches(constraints, other) == ("color" not in constraints)
        assert not caption_matches(constraints, None)
    assert caption_matches({BACKGROUND: BACKGROUND}, None)
    assert not caption_matches({BACKGROUND: BACKGROUND}, attrs)


def test_multi_positive_loss_hand_numbers():
    n = 4
    same = torch.ones((n, 8))
    # all logits equal -> every log-softmax is -log n, whatever the positives
    loss = multi_positive_clip_loss(same, same, torch.tensor(0.0), torch.eye(n))
    assert float(loss) == pytest.approx(math.log(n), rel=1e-5)
    # orthogonal matched pairs at scale 100: the diagonal dominates, loss ~ 0
    eye = torch.eye(n)
    assert float(multi_positive_clip_loss(eye, eye, torch.tensor(math.log(100.0)), torch.eye(n))) < 1e-3
    # two identical captions of one object: both columns are positives, half the target mass each
    match = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    loss = multi_positive_clip_loss(torch.ones((2, 3)), torch.ones((2, 3)), torch.tensor(0.0), match)
    assert float(loss) == pytest.approx(math.log(2), rel=1e-5)


def test_training_is_deterministic(tmp_path):
    """Two short runs with the same seed write byte-identical weights (the shipped file's regeneration claim)."""
    from llavaseg.recipes.train_clip import ClipTrainConfig, train_clip

    config = ClipTrainConfig(steps=3, pool_scenes=16, batch=8, warmup_steps=1)
    for name in ("a", "b"):
        train_clip(tmp_path / name, config, progress=False, eval_scenes=2)
    files = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_identity_does_not_depend_on_where_the_weights_live(tmp_path):
    """Adapters record the text encoder's identity; a moved checkout or an installed wheel must still match."""
    import shutil

    from llavaseg.models.text_encoder import FrozenTextEncoder

    shipped = FrozenTextEncoder.create(f"local-dir:{WEIGHTS_DIR}").identity()
    moved = shutil.copytree(WEIGHTS_DIR, tmp_path / "elsewhere" / WEIGHTS_DIR.name)
    assert FrozenTextEncoder.create(f"local-dir:{moved}").identity() == shipped
    renamed = shutil.copytree(WEIGHTS_DIR, tmp_path / "other-name")
    assert FrozenTextEncoder.create(f"local-dir:{renamed}").identity()["weights"] == shipped["weights"]
