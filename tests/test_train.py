"""Adapter training: LISA's losses on hand-computed tensors, mixture rates, schedule, overfitting, exact resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from llavaseg.data.mixture import Mixture
from llavaseg.errors import CheckpointMismatchError, InputError
from llavaseg.train import (
    TrainConfig,
    dice_loss,
    lr_factor,
    mask_loss,
    sigmoid_bce_loss,
    train_adapters,
)

# ----------------------------------------------------------------------------------------------- losses (e)


def _lisa_reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """LISA's ``sigmoid_ce_loss`` and ``dice_loss`` (model/LISA.py) transcribed verbatim, N x H x W, no ignore."""
    num_masks = logits.shape[0]
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    bce = bce.flatten(1, 2).mean(1).sum() / (num_masks + 1e-8)
    scale, eps = 1000, 1e-6
    probs = logits.sigmoid().flatten(1, 2)
    flat = targets.flatten(1, 2)
    numerator = 2 * (probs / scale * flat).sum(-1)
    denominator = (probs / scale).sum(-1) + (flat / scale).sum(-1)
    dice = (1 - (numerator + eps) / (denominator + eps)).sum() / (num_masks + 1e-8)
    return float(bce), float(dice)


def test_bce_and_dice_by_hand() -> None:
    logits = torch.zeros(2, 2)  # sigmoid = 0.5 everywhere
    target = np.array([[1, 0], [0, 0]], dtype=np.uint8)
    # BCE of logit 0 is log 2 for either label.
    assert float(sigmoid_bce_loss(logits, target)) == pytest.approx(math.log(2), abs=1e-7)
    # Dice: numerator 2 * 0.5/1000 = 0.001, denominator 4*0.5/1000 + 1/1000 = 0.003.
    assert float(dice_loss(logits, target)) == pytest.approx(1 - (0.001 + 1e-6) / (0.003 + 1e-6), abs=1e-7)

    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    target = np.array([[1, 0], [1, 255]], dtype=np.uint8)  # one ignored pixel
    valid_bce = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(-1.0)), math.log(2)]
    assert float(sigmoid_bce_loss(logits, target)) == pytest.approx(sum(valid_bce) / 3, abs=1e-6)
    p = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0)), 0.5]  # the ignored logit 3.0 plays no part
    numerator = 2 * (p[0] + p[2]) / 1000
    denominator = sum(p) / 1000 + 2 / 1000
    assert float(dice_loss(logits, target)) == pytest.approx(1 - (numerator + 1e-6) / (denominator + 1e-6), abs=1e-6)


def test_losses_equal_lisa_without_ignore_pixels() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 7, generator=generator) * 3
    targets = (torch.rand(3, 5, 7, generator=generator) > 0.6).float()
    ref_bce, ref_dice = _lisa_reference(logits, targets)
    total, bce, dice = mask_loss(list(logits), [t.numpy().astype(np.uint8) for t in targets])
    assert float(bce) == pytest.approx(ref_bce, rel=1e-6)
    assert float(dice) == pytest.approx(ref_dice, rel=1e-6)
    assert float(total) == pytest.approx(2.0 * ref_bce + 0.5 * ref_dice, rel=1e-6)


def test_loss_refuses_low_resolution_logits() -> None:
    with pytest.raises(InputError, match="ground-truth resolution"):
        sigmoid_bce_loss(torch.zeros(4, 4), np.zeros((8, 8), dtype=np.uint8))


def test_lr_schedule() -> None:
    assert lr_factor(0, warmup=4, total=20) == pytest.approx(0.25)
    assert lr_factor(3, warmup=4, total=20) == pytest.approx(1.0)
    assert lr_factor(4, warmup=4, total=20) == pytest.approx(1.0)
    assert lr_factor(12, warmup=4, total=20) == pytest.approx(0.5)  # half way through the cosine
    assert lr_factor(20, warmup=4, total=20) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(12, warmup=4, total=20, schedule="linear") == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- mixture (f)


def test_mixture_rates_match_lisa_over_10k_draws() -> None:
    sources = [(list(range(n)), rate) for n, rate in ((50, 9), (7, 3), (1000, 3), (3, 1))]
    mixture = Mixture(sources, seed=1)
    counts = np.zeros(4)
    rng = np.random.default_rng(5)
    for _ in range(10_000):
        source, item = mixture.draw_index(rng)
        assert 0 <= item < len(sources[source][0])
        counts[source] += 1
    expected = np.array([9, 3, 3, 1]) / 16
    # binomial sd <= 0.005 at n=10k: 0.015 is three of them
    assert np.abs(counts / 10_000 - expected).max() < 0.015
    # the stateless per-step batches follow the same rates
    steps = np.array([s for step in range(1250) for s, _ in mixture.batch_indices(step, 8)])
    assert np.abs(np.bincount(steps, minlength=4) / steps.size - expected).max() < 0.015


def test_mixture_is_deterministic_and_single_source_covers_each_epoch() -> None:
    a = Mixture([(list("abcdefg"), 1), (list("xyz"), 2)], seed=4)
    b = Mixture([(list("abcdefg"), 1), (list("xyz"), 2)], seed=4)
    assert a.sample(50) == b.sample(50)
    assert a.batch(17, 5) == b.batch(17, 5)
    assert Mixture([(list("abcdefg"), 1), (list("xyz"), 2)], seed=5).sample(50) != b.sample(50)
    single = Mixture([(list(range(10)), 1)], seed=0)
    seen = [item for step in range(5) for item in single.batch(step, 4)]  # 20 items = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]
    with pytest.raises(InputError):
        Mixture([(list("ab"), 0)])


# ------------------------------------------------------------------------------------ training (b) and (c)


@pytest.fixture(scope="module")
def world(make_tiny_world):
    return make_tiny_world(seed=3, sizes={"train": 3, "val": 2})


@pytest.fixture(scope="module")
def frozen(tiny_sam_and_text_encoder):
    """Random tiny SAM + text encoder; teacher stages, so no MLLM is needed for these tests."""
    from llavaseg.models.presets import PRESETS

    class Frozen:
        preset = PRESETS["tiny"]
        sam, text_encoder = tiny_sam_and_text_encoder
        mllm = None
        prompts = None

    return Frozen()


def _config(world, tmp_path, name: str, **overrides) -> TrainConfig:
    values = dict(preset="tiny", data=world, stage_source="teacher", steps=6, batch_size=2, lr=2e-3,
                  warmup_steps=2, eval_every=0, checkpoint_every=0, cache_dir=tmp_path / "cache",
                  checkpoint_dir=tmp_path / f"ckpt-{name}", out=tmp_path / name, progress=False, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def test_loss_decreases_when_overfitting(world, frozen, tmp_path) -> None:
    config = _config(world, tmp_path, "overfit", steps=30, batch_size=4, lr=1e-2, warmup_steps=3, val_split=None)
    result = train_adapters(config, frozen=frozen)
    losses = [p.loss for p in result.losses]
    assert len(losses) == 30  # logged every step for a run this short
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    # measured: about 1.82 -> 1.52 with the random tiny SAM (it bounds how far the adapters alone can go)
    assert last < first - 0.2, (first, last)
    assert np.mean(losses[10:15]) < np.mean(losses[:5])
    assert result.completed and (tmp_path / "overfit" / "adapters.safetensors").is_file()


def test_interrupt_and_resume_gives_identical_weights(world, frozen, tmp_path) -> None:
    straight = train_adapters(_config(world, tmp_path, "straight", attribute_dropout=0.5), frozen=frozen)
    assert straight.completed and straight.resumed_from is None
    config = _config(world, tmp_path, "resumed", attribute_dropout=0.5)
    first = train_adapters(config, frozen=frozen, stop_after=3)
    assert not first.completed and first.step == 3 and first.out is None
    assert not (tmp_path / "resumed").exists()
    second = train_adapters(config, frozen=frozen)
    assert second.completed and second.resumed_from == 3 and second.step == 6
    a = load_file(str(tmp_path / "straight" / "adapters.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.loss for p in straight.losses] == [p.loss for p in second.losses]
    # the card records data, steps, validation scores and parameter count
    card = json.loads((tmp_path / "resumed" / "card.json").read_text())
    assert card["steps"] == 6 and card["parameter_count"] == second.parameter_count
    assert card["val"]["n_queries"] == 2 and card["val"]["giou"] is not None
    assert (tmp_path / "resumed" / "README.md").read_text().startswith("# Adapters `resumed`")


def test_resume_refuses_a_checkpoint_of_another_run(world, frozen, tmp_path) -> None:
    config = _config(world, tmp_path, "run", val_split=None)
    train_adapters(config, frozen=frozen, stop_after=1)
    changed = config.model_copy(update={"lr": 1e-2})
    with pytest.raises(CheckpointMismatchError, match="lr"):
        train_adapters(changed, frozen=frozen)


def test_validation_accepts_any_dataset_kind(world, frozen, tmp_path) -> None:
    """A JSONL validation set (not only ReasonSeg), read through the same data set registry as the benchmark."""
    from llavaseg.data.reasonseg import ReasonSegDataset
    from llavaseg.data.registry import DataSource
    from llavaseg.models.components import build_mllm
    from llavaseg.prompting import PromptSet

    lines = []
    for sample in ReasonSegDataset(world, "val"):
        shapes = json.loads(sample.json_path.read_text())["shapes"]
        lines.append(json.dumps({"image": str(sample.image_path), "query": sample.texts[0], "polygons": shapes}))
    (tmp_path / "val.jsonl").write_text("\n".join(lines) + "\n")

    class WithMLLM:
        preset, sam, text_encoder = frozen.preset, frozen.sam, frozen.text_encoder
        mllm = build_mllm("random:tiny", device="cpu", dtype=None, quantization=None)
        prompts = PromptSet.load()

    WithMLLM.mllm.max_new_tokens = 4
    config = _config(world, tmp_path, "jsonl-val", stage_source="mllm", steps=2,
                     validation=DataSource(kind="jsonl", path=tmp_path / "val.jsonl"))
    result = train_adapters(config, frozen=WithMLLM())
    assert result.completed and result.val is not None and result.val.n_queries == len(lines) == 2
    assert [p.step for p in result.val_history] == [0, 2]
