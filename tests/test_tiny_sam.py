"""The shipped tiny-world SAM: exact fit to its spec, and a real segmenter with an oracle box."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llavaseg.errors import CheckpointMismatchError
from llavaseg.models.sam_spec import SAM_SPECS, build_sam_from_spec
from llavaseg.recipes.train_sam import (
    SPEC_NAME,
    WEIGHTS_DIR,
    WEIGHTS_NAME,
    TrainConfig,
    _step_loss,
    evaluate_oracle_box,
    load_tiny_world_sam,
)

WEIGHTS = WEIGHTS_DIR / f"{WEIGHTS_NAME}.safetensors"
REPORT = WEIGHTS_DIR / f"{WEIGHTS_NAME}.json"


def test_weights_fit_the_spec_exactly() -> None:
    state = load_file(str(WEIGHTS))
    sam = build_sam_from_spec(SAM_SPECS["tiny-world"])
    own = sam.state_dict()
    assert set(state) == set(own)
    assert all(tuple(state[k].shape) == tuple(own[k].shape) for k in own)
    sam.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    assert sum(p.numel() for p in sam.parameters()) <= 1_500_000
    report = json.loads(REPORT.read_text())
    assert report["config"]["spec"] == SPEC_NAME
    assert report["spec_fields"] == SAM_SPECS[SPEC_NAME].model_dump(mode="json")
    assert report["val_oracle_box_miou"] >= 0.85


def test_oracle_box_iou_on_fresh_val_scenes() -> None:
    torch.set_num_threads(1)
    sam = load_tiny_world_sam()
    miou, target_miou, n = evaluate_oracle_box(sam, "val", seed=7, n_scenes=10)  # a seed the weights never saw
    assert n >= 30
    assert miou >= 0.8 and target_miou >= 0.8


def test_wrong_weights_are_rejected(tmp_path) -> None:
    from safetensors.torch import save_file

    state = load_file(str(WEIGHTS))
    state.pop(next(iter(state)))
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(CheckpointMismatchError):
        load_tiny_world_sam(bad)


def test_training_step_is_deterministic() -> None:
    torch.set_num_threads(1)
    cfg = TrainConfig(images_per_step=1)
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        sam = build_sam_from_spec(SAM_SPECS["tiny-world"]).train()
        losses.append(float(_step_loss(sam, cfg, 0).detach()))
    assert losses[0] == losses[1] and np.isfinite(losses[0])
