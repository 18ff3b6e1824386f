"""Pretrain the tiny-world SAM as a promptable segmenter (points and boxes), to be frozen afterwards.

Why: LLaVASeg prompts a *frozen, pretrained* SAM. No SAM weights can be downloaded here, so a small SAM
(``SAM_SPECS["tiny-world"]``, built from segment_anything's own classes) is trained from scratch on
tiny-world scenes, the way SAM itself was trained: every object of a scene is a target, prompted by a
jittered box or by a few random points, with BCE + Dice on the single-mask output (token 0, what the
pipeline uses with ``multimask_output=False``) plus the best of the three multimask outputs, and an MSE
loss for the IoU head. It goes through the standard path (``image_encoder(preprocess(x))``,
``prompt_encoder(points, boxes, masks=None)``, ``mask_decoder``), decoding one image embedding with all of
that image's prompts at a time, as the decoder expects.

Scenes come from the endless ``"sam"`` split stream of :mod:`llavaseg.tinyworld.generate`, disjoint from the
val/test scenes the result is measured on. Everything that is random is seeded from ``(seed, step)``, so a run
resumed from its checkpoint continues exactly like an uninterrupted one.

CLI: ``python -m llavaseg.recipes.train_sam --out llavaseg/weights/tinyworld --steps N --seed 0``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from segment_anything.modeling import Sam

from llavaseg.atomic import atomic_write, atomic_write_text
from llavaseg.errors import CheckpointMismatchError, InputError
from llavaseg.losses import per_mask_bce, per_mask_dice
from llavaseg.models.sam_spec import SAM_SPECS, build_sam_from_spec
from llavaseg.paths import TINY_WORLD_WEIGHTS
from llavaseg.provenance import machine
from llavaseg.tinyworld.generate import scene_rng
from llavaseg.tinyworld.scenes import object_masks, render_scene_array, sample_scene
from llavaseg.train.schedule import warmup_cosine_lr
from llavaseg.train.state import load_state, save_state

__all__ = [
    "SPEC_NAME",
    "WEIGHTS_DIR",
    "WEIGHTS_NAME",
    "TrainConfig",
    "TrainReport",
    "load_tiny_world_sam",
    "scene_batch",
    "mask_boxes",
    "predict_with_boxes",
    "evaluate_oracle_box",
    "train_sam",
    "main",
]

SPEC_NAME = "tiny-world"
WEIGHTS_DIR = TINY_WORLD_WEIGHTS
WEIGHTS_NAME = "sam_tiny_world"


class TrainConfig(BaseModel):
    """Everything that determines the trained weights (recorded next to them)."""

    spec: str = SPEC_NAME
    steps: int = 500  # what the shipped weights used (their figures: the card beside them)
    seed: int = 0
    data_seed: int = 0
    images_per_step: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 150
    weight_decay: float = 0.01
    box_noise_px: float = 3.0
    max_points: int = 3
    checkpoint_every: int = 100


class TrainReport(BaseModel):
    """What a finished run measured; written as ``sam_tiny_world.json`` beside the weights."""

    config: TrainConfig
    spec_fields: dict
    n_params: int
    threads: int
    train_seconds: float
    final_loss: float
    val_split: str = "val"
    val_scenes: int
    val_objects: int
    val_oracle_box_miou: float
    val_oracle_box_miou_inclusive: float
    val_target_miou: float
    torch_version: str
    machine: dict = Field(default_factory=dict)


# -------------------------------------------------------------------------------------------------- data


def mask_boxes(masks: np.ndarray, inclusive: bool = False) -> np.ndarray:
    """XYXY boxes of boolean masks ``(N, H, W)``; ``x1 = last column + 1`` unless ``inclusive``."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        end = 0 if inclusive else 1
        boxes[i] = (xs.min(), ys.min(), xs.max() + end, ys.max() + end)
    return boxes


def scene_batch(split: str, seed: int, indices: list[int]) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """``(image HxWx3 uint8, visible masks (n, H, W) bool, focus index)`` for the given scenes of a split."""
    out = []
    for i in indices:
        scene = sample_scene(scene_rng(split, seed, i))
        out.append((render_scene_array(scene), object_masks(scene), scene.focus_index))
    return out


def _noisy_boxes(masks: np.ndarray, rng: np.random.Generator, noise_px: float) -> np.ndarray:
    """Oracle boxes with per-coordinate Gaussian jitter (std up to ``noise_px``, 10% of the side for small
    objects); a quarter of the boxes stay exact so the exact-box case is trained directly."""
    boxes = mask_boxes(masks)
    side = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
    std = np.minimum(0.1 * side, noise_px)
    noise = np.clip(rng.normal(0.0, 1.0, size=boxes.shape) * std, -2 * noise_px, 2 * noise_px)
    noise[rng.random(len(boxes)) < 0.25] = 0.0
    size = masks.shape[-1]
    return np.clip(boxes + noise, 0, size).astype(np.float32)


def _random_points(masks: np.ndarray, rng: np.random.Generator, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """1..max_points positive clicks inside each visible mask, sometimes one negative click outside it.

    Shape ``(N, max_points + 1, 2)`` with label -1 padding, as SamPredictor pads point prompts.
    """
    n = len(masks)
    coords = np.zeros((n, max_points + 1, 2), dtype=np.float32)
    labels = -np.ones((n, max_points + 1), dtype=np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        k = int(rng.integers(1, max_points + 1))
        pick = rng.integers(len(xs), size=k)
        coords[i, :k] = np.stack([xs[pick], ys[pick]], axis=1)
        labels[i, :k] = 1
        if rng.random() < 0.3:
            ys_n, xs_n = np.nonzero(~m)
            j = int(rng.integers(len(xs_n)))
            coords[i, k] = (xs_n[j], ys_n[j])
            labels[i, k] = 0
    return coords, labels


# ---------------------------------------------------------------------------------------------- model I/O


def _to_input(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


def load_tiny_world_sam(path: Path | str | None = None) -> Sam:
    """The shipped (or given) tiny-world SAM weights in ``build_sam_from_spec(SAM_SPECS["tiny-world"])``, eval mode.

    Keys and shapes must match exactly; anything else raises :class:`CheckpointMismatchError`.
    """
    path = Path(path) if path is not None else WEIGHTS_DIR / f"{WEIGHTS_NAME}.safetensors"
    if not path.is_file():
        raise InputError(f"tiny-world SAM weights not found: {path}")
    sam = build_sam_from_spec(SAM_SPECS[SPEC_NAME])
    state = load_file(str(path))
    own = sam.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or bad:
        first = (missing or extra or bad)[0]
        raise CheckpointMismatchError(
            f"{path} does not fit SAM spec {SPEC_NAME!r}: {len(missing)} missing, {len(extra)} unexpected, "
            f"{len(bad)} mis-shaped tensors (e.g. {first})"
        )
    sam.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return sam.eval()


@torch.no_grad()
def predict_with_boxes(sam: Sam, image: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
    """Mask logits ``(N, H, W)`` for one ``uint8 HxWx3`` image and N XYXY pixel boxes, single-mask output."""
    x = sam.preprocess(_to_input([image]))
    emb = sam.image_encoder(x)
    sparse, dense = sam.prompt_encoder(points=None, boxes=torch.from_numpy(boxes).float(), masks=None)
    low, _ = sam.mask_decoder(
        image_embeddings=emb,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    h, w = image.shape[:2]
    return sam.postprocess_masks(low, (h, w), (h, w))[:, 0]


def evaluate_oracle_box(
    sam: Sam, split: str = "val", seed: int = 0, n_scenes: int = 100, inclusive: bool = False
) -> tuple[float, float, int]:
    """Mean IoU over every object of the first ``n_scenes`` scenes with its exact box, ``multimask_output=False``.

    Returns ``(mIoU over all objects, mIoU over the ReasonSeg targets only, number of objects)``.
    """
    ious: list[float] = []
    target_ious: list[float] = []
    sam.eval()
    for image, masks, focus in scene_batch(split, seed, list(range(n_scenes))):
        pred = (predict_with_boxes(sam, image, mask_boxes(masks, inclusive)) > sam.mask_threshold).numpy()
        inter = (pred & masks).sum(axis=(1, 2))
        union = (pred | masks).sum(axis=(1, 2))
        scene_ious = (inter / np.maximum(union, 1)).tolist()
        ious += scene_ious
        target_ious.append(scene_ious[focus])
    return float(np.mean(ious)), float(np.mean(target_ious)), len(ious)


# ---------------------------------------------------------------------------------------------- training


def _decode_loss(sam: Sam, emb: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Loss of one image's prompts: token 0 directly, best of tokens 1-3, and the IoU head (MSE)."""
    masks, iou_pred = sam.mask_decoder.predict_masks(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense)
    size = gt.shape[-1]
    logits = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
    target = gt[:, None].expand_as(logits)
    per = per_mask_bce(logits, target) + per_mask_dice(logits, target, scale=1.0, eps=1.0)  # smoothed Dice
    single = per[:, 0]
    multi = per[:, 1:].min(dim=1).values
    with torch.no_grad():
        hard = logits > sam.mask_threshold
        true_iou = (hard & (target > 0.5)).sum(dim=(2, 3)) / ((hard | (target > 0.5)).sum(dim=(2, 3)).clamp(min=1))
    iou_loss = F.mse_loss(iou_pred, true_iou.float())
    return single.mean() + multi.mean() + iou_loss


def _step_loss(sam: Sam, cfg: TrainConfig, step: int) -> torch.Tensor:
    rng = np.random.default_rng([cfg.seed, step])
    first = step * cfg.images_per_step
    batch = scene_batch("sam", cfg.data_seed, list(range(first, first + cfg.images_per_step)))
    emb_all = sam.image_encoder(sam.preprocess(_to_input([b[0] for b in batch])))
    total = torch.zeros(())
    for k, (_, masks, _) in enumerate(batch):
        gt = torch.from_numpy(masks).float()
        emb = emb_all[k : k + 1]
        boxes = torch.from_numpy(_noisy_boxes(masks, rng, cfg.box_noise_px))
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        total = total + _decode_loss(sam, emb, sparse, dense, gt)
        coords, labels = _random_points(masks, rng, cfg.max_points)
        sparse, dense = sam.prompt_encoder(points=(torch.from_numpy(coords), torch.from_numpy(labels)), boxes=None, masks=None)
        total = total + 0.5 * _decode_loss(sam, emb, sparse, dense, gt)
    return total / len(batch)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    return warmup_cosine_lr(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps, total=cfg.steps)


def _weights_metadata(cfg: TrainConfig) -> dict[str, str]:
    """One metadata key: safetensors writes a multi-key header in hash order, which varies between processes
    and would make otherwise identical weight files differ byte-wise."""
    return {"llavaseg": json.dumps({"spec": cfg.spec, "seed": cfg.seed, "steps": cfg.steps}, sort_keys=True)}


def _atomic_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _report(sam: Sam, cfg: TrainConfig, *, threads: int, train_seconds: float, loss_ema: float,
            evaluate: bool) -> TrainReport:
    """The trained model's val figures (oracle-box mIoU on 100 val scenes) and how it was made."""
    miou = miou_incl = target_miou = float("nan")
    n_obj = 0
    if evaluate:
        miou, target_miou, n_obj = evaluate_oracle_box(sam, "val", 0, 100)
        miou_incl, _, _ = evaluate_oracle_box(sam, "val", 0, 100, inclusive=True)
    return TrainReport(
        config=cfg, spec_fields=SAM_SPECS[cfg.spec].model_dump(mode="json"),
        n_params=sum(p.numel() for p in sam.parameters()), threads=threads, train_seconds=round(train_seconds, 1),
        final_loss=round(loss_ema, 5), val_scenes=100, val_objects=n_obj, val_oracle_box_miou=round(miou, 4),
        val_oracle_box_miou_inclusive=round(miou_incl, 4), val_target_miou=round(target_miou, 4),
        torch_version=torch.__version__, machine={**machine(), "threads": threads})


def train_sam(cfg: TrainConfig, out_dir: Path, threads: int = 1, log_every: int = 25, evaluate: bool = True) -> TrainReport:
    """Train from scratch (or resume ``out_dir/.sam_tiny_world.state`` if it was written with the same config),
    then write ``sam_tiny_world.safetensors`` and its JSON report atomically.
    """
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir = out_dir / f".{WEIGHTS_NAME}.state"
    torch.manual_seed(cfg.seed)
    sam = build_sam_from_spec(SAM_SPECS[cfg.spec])
    sam.train()
    opt = torch.optim.AdamW(sam.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, elapsed, loss_ema = 0, 0.0, float("nan")
    resumed = load_state(state_dir, identity={"config": cfg.model_dump()}, optimizer=opt)
    if resumed is not None:
        sam.load_state_dict(resumed.model)
        start, elapsed, loss_ema = resumed.step, resumed.extra["elapsed"], resumed.extra["loss_ema"]
        print(f"resumed from {state_dir} at step {start}", flush=True)
    t0 = time.perf_counter() - elapsed
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        loss = _step_loss(sam, cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        loss_ema = value if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * value
        done = step + 1
        if done % log_every == 0 or done == cfg.steps:
            print(f"step {done}/{cfg.steps} loss {loss_ema:.4f} lr {_lr_at(cfg, step):.2e} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            save_state(state_dir, step=done, identity={"config": cfg.model_dump()}, model=sam.state_dict(),
                       optimizer=opt, extra={"elapsed": time.perf_counter() - t0, "loss_ema": loss_ema})
    train_seconds = time.perf_counter() - t0
    sam.eval()
    _atomic_safetensors(sam.state_dict(), out_dir / f"{WEIGHTS_NAME}.safetensors", _weights_metadata(cfg))
    report = _report(sam, cfg, threads=threads, train_seconds=train_seconds, loss_ema=loss_ema, evaluate=evaluate)
    atomic_write_text(out_dir / f"{WEIGHTS_NAME}.json", json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    shutil.rmtree(state_dir, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Pretrain the tiny-world SAM on generated scenes.")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--steps", type=int, default=TrainConfig().steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--images-per-step", type=int, default=TrainConfig().images_per_step)
    parser.add_argument("--lr", type=float, default=TrainConfig().lr)
    parser.add_argument("--threads", type=int, default=1,
                        help="1 (the default) reproduces the shipped weights byte for byte")
    parser.add_argument("--no-eval", action="store_true", help="skip the val evaluation (for quick reruns)")
    args = parser.parse_args(argv)
    cfg = TrainConfig(steps=args.steps, seed=args.seed, data_seed=args.data_seed,
                      images_per_step=args.images_per_step, lr=args.lr)
    report = train_sam(cfg, args.out, threads=args.threads, evaluate=not args.no_eval)
    print(json.dumps(report.model_dump(mode="json"), indent=2))
    return 0


if __name__ == "__main__":
    from llavaseg.errors import run_guarded

    raise SystemExit(run_guarded("python -m llavaseg.recipes.train_sam", main))
