"""Tiny-world [SEG] trainer helpers: LISA's LR schedule, optimiser checkpoints, batch mixing."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from llavaseg.recipes.train_seg_token import (
    SegTokenTrainConfig,
    TrainData,
    step_samples,
)
from llavaseg.seg_token.train import SegSample, warmup_decay
from llavaseg.train.state import load_state, save_state


def _optimizer() -> tuple[torch.nn.Linear, torch.optim.AdamW]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    return layer, torch.optim.AdamW(layer.parameters(), lr=1.0, betas=(0.9, 0.95), weight_decay=0.0)


def test_warmup_decay_is_linear_up_then_down():
    _, optimizer = _optimizer()
    scheduler = warmup_decay(optimizer, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_optimizer_checkpoint_resumes_exactly(tmp_path):
    layer, optimizer = _optimizer()
    scheduler = warmup_decay(optimizer, 2, 10)
    for _ in range(3):
        layer(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    save_state(tmp_path / "state", step=3, identity={}, model=layer.state_dict(), optimizer=optimizer,
               scheduler=scheduler)
    restored_layer, restored = _optimizer()
    resumed = warmup_decay(restored, 2, 10)
    state = load_state(tmp_path / "state", identity={}, optimizer=restored, scheduler=resumed)
    restored_layer.load_state_dict(state.model)
    assert state.step == 3
    assert restored.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"]) == pytest.approx(0.875)
    for model, opt, sched in ((layer, optimizer, scheduler), (restored_layer, restored, resumed)):
        opt.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        sched.step()
    assert torch.equal(layer.weight, restored_layer.weight)


def test_step_samples_mix_dialogue_at_the_vqa_rate():
    image = np.zeros((4, 4, 3), np.uint8)
    seg = [SegSample(image, f"q{i}", mask=np.zeros((4, 4), np.uint8)) for i in range(3)]
    vqa = [SegSample(image, "what ?", answer="red")]
    data = TrainData(seg, [None] * 3, vqa, [None])  # type: ignore[list-item]
    config = SegTokenTrainConfig(batch_size=4000, vqa_rate=0.25)
    samples, _ = step_samples(data, config, random.Random(0))
    share = sum(s.mask is None for s in samples) / len(samples)
    assert share == pytest.approx(0.25, abs=0.03)
    assert step_samples(data, config, random.Random(0))[0] == samples  # seeded per step: reproducible
