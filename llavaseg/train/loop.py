"""Train the multi-scale adapters on cached frozen features (the only trainable part of the LLaVASeg route).

    >>> from llavaseg.train import TrainConfig, train_adapters
    >>> result = train_adapters(TrainConfig(preset="tiny-world", steps=2000, out="adapters/tiny-world"))
    >>> result.val.giou, result.val.ciou

Pipeline: build (or resume) the feature cache for the train and val splits (:mod:`llavaseg.cache`), then
run AdamW on the adapters alone. The frozen models stay in ``eval()`` with ``requires_grad=False``:
gradients reach the adapters *through* SAM's frozen mask decoder (``adapter_mask_logits``) but no frozen
parameter ever gets a ``.grad`` or changes (``tests/test_frozen.py`` checks it bit for bit).

Loss (LISA, ``model/LISA.py``; anchors §2.2), on logits upsampled to the **original ground-truth
resolution** exactly as inference does (``Sam.postprocess_masks``)::

    L = bce_weight * mean_masks(BCE_m) + dice_weight * mean_masks(DICE_m)        (LISA: 2.0 and 0.5)
    BCE_m  = mean over the mask's pixels of binary_cross_entropy_with_logits
    DICE_m = 1 - (2 * sum(p/1000 * t) + 1e-6) / (sum(p/1000) + sum(t/1000) + 1e-6),   p = sigmoid(logits)

(the ``/1000`` is LISA's ``scale=1000`` quirk, kept so the numbers are comparable). **Ignore pixels**
(ground truth 255, e.g. ReasonSeg "ignore" polygons) are *excluded*: BCE is averaged over the valid pixels
only and both Dice sums skip them. LISA itself trains on ``mask == 1`` and so treats them as background; the
two agree whenever a mask has no 255 pixel (always true in the tiny world).

Schedule: linear warm-up over ``warmup_steps`` then cosine (or linear) decay to 0 at ``steps``; gradient
clipping at ``grad_clip`` (LISA: 1.0); AdamW with LISA's betas (0.9, 0.95). Determinism: adapters are
initialised from ``torch.manual_seed(seed)``; batches are a pure function of ``(seed, step)`` (a per-epoch
permutation, or LISA's rate-weighted draw for mixtures, :class:`llavaseg.data.mixture.Mixture`); attribute
dropout uses a seeded ``numpy`` Generator whose state is checkpointed. Checkpoints (adapters, optimizer,
scheduler, RNG states, step, histories) are written atomically every ``checkpoint_every`` steps; a rerun
with the same config resumes from the latest and ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import load_file, save_file

from llavaseg.atomic import atomic_write
from llavaseg.cache import (
    CachedSample,
    FeatureCache,
    TeacherStages,
    build_cache,
    cache_identity,
    default_cache_root,
)
from llavaseg.data.mixture import Mixture
from llavaseg.errors import CheckpointMismatchError, InputError
from llavaseg.evaluate import MetricAccumulator, SplitMetrics
from llavaseg.models.adapters import MultiScaleAdapters, save_adapters
from llavaseg.models.sam import FrozenSAM, SamImageFeatures

__all__ = [
    "DataSource",
    "TrainConfig",
    "TrainResult",
    "ValPoint",
    "sigmoid_bce_loss",
    "dice_loss",
    "mask_loss",
    "lr_factor",
    "adapter_train_step",
    "evaluate_cached",
    "train_adapters",
]

CHECKPOINT_FORMAT = 1
DICE_SCALE = 1000.0
DICE_EPS = 1e-6


# ------------------------------------------------------------------------------------------------- config
class DataSource(BaseModel):
    """One dataset of a training mixture and its sampling rate (LISA's ``--sample_rates``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["reasonseg", "refcoco", "jsonl"] = "reasonseg"
    path: Path
    split: str = "train"
    rate: float = Field(1.0, gt=0)
    refcoco_dataset: str = "refcoco"
    split_by: str = "unc"


class TrainConfig(BaseModel):
    """Everything that defines an adapter training run (JSON-serialisable: ``--config file.json``)."""

    model_config = ConfigDict(extra="forbid")

    data: Path | None = Field(None, description="ReasonSeg-format root (default for tiny-world: the generated tiny world)")
    mixture: list[DataSource] = Field(default_factory=list, description="train on these sources with rates instead of `data`")
    split: str = "train"
    val_data: Path | None = Field(None, description="ReasonSeg-format root for validation (default: data)")
    val_split: str | None = "val"
    val_first_text_only: bool = True  # LISA's validate() scores only the first text per image
    preset: str = "tiny-world"
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "linear"] = "cosine"
    grad_clip: float | None = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    attribute_dropout: float = Field(0.0, ge=0.0, le=1.0,
                                     description="probability of training a sample on its description alone")
    seed: int = 0
    eval_every: int = Field(200, ge=0)
    checkpoint_every: int = Field(100, ge=0)
    out: Path = Path("adapters/custom")
    device: str = "cpu"
    stage_source: Literal["mllm", "teacher"] = "mllm"
    cache_dir: Path | None = None
    cache_namespace: bool = False
    cache_batch_size: int = Field(8, ge=1)
    checkpoint_dir: Path | None = None
    resume: bool = True
    threads: int | None = None
    adapter_dim: int | None = None
    adapter_heads: int | None = None
    adapter_scales: tuple[int, ...] | None = None
    progress: bool = True

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device must be cpu, cuda[:N] or mps, got {value!r}")
        return value


# Fields that do not change the trained weights: they may differ between a run and its resumption.
_RESUME_FREE = {"eval_every", "checkpoint_every", "out", "device", "cache_dir", "cache_namespace", "cache_batch_size",
                "checkpoint_dir", "resume", "threads", "progress", "val_data", "val_split", "val_first_text_only"}


class ValPoint(BaseModel):
    step: int
    giou: float | None
    ciou: float | None
    giou_noattr: float | None = None
    ciou_noattr: float | None = None
    n_queries: int


class LossPoint(BaseModel):
    step: int
    loss: float
    bce: float
    dice: float
    lr: float


class TrainResult(BaseModel):
    """What a run produced. ``completed`` is False when it stopped early (``stop_after``): resume it."""

    out: Path | None
    checkpoint_dir: Path
    completed: bool
    step: int
    steps: int
    parameter_count: int
    losses: list[LossPoint]
    val_history: list[ValPoint]
    val: ValPoint | None
    resumed_from: int | None
    cache_seconds: float
    train_seconds: float
    wall_seconds: float
    step_seconds: float | None
    n_train_queries: int
    n_val_queries: int


# --------------------------------------------------------------------------------------------------- losses
def _prepare(logits: torch.Tensor, target: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    target = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor) else target)
    if logits.shape[-2:] != target.shape[-2:]:
        raise InputError(f"logits {tuple(logits.shape)} and mask {tuple(target.shape)} differ in size; "
                         "upsample logits to the ground-truth resolution first")
    logits = logits.reshape(target.shape[-2:]).float()
    valid = target != 255
    return logits, (target == 1).to(logits.dtype), valid.to(logits.dtype)


def sigmoid_bce_loss(logits: torch.Tensor, target: torch.Tensor | np.ndarray) -> torch.Tensor:
    """LISA's ``sigmoid_ce_loss`` for ONE mask: mean over pixels of BCE-with-logits, ignore (255) excluded."""
    logits, target, valid = _prepare(logits, target)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1.0)


def dice_loss(logits: torch.Tensor, target: torch.Tensor | np.ndarray, scale: float = DICE_SCALE,
              eps: float = DICE_EPS) -> torch.Tensor:
    """LISA's ``dice_loss`` for ONE mask (with its ``scale=1000``), ignore (255) pixels excluded."""
    logits, target, valid = _prepare(logits, target)
    probs = logits.sigmoid() * valid
    target = target * valid
    numerator = 2 * (probs / scale * target).sum()
    denominator = (probs / scale).sum() + (target / scale).sum()
    return 1 - (numerator + eps) / (denominator + eps)


def mask_loss(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor | np.ndarray], *,
              bce_weight: float = 2.0, dice_weight: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, bce, dice)`` averaged over masks, each at its own (original) resolution, as LISA."""
    if len(logits) != len(targets) or not logits:
        raise InputError(f"{len(logits)} predictions for {len(targets)} masks")
    bce = torch.stack([sigmoid_bce_loss(l, t) for l, t in zip(logits, targets)]).mean()
    dice = torch.stack([dice_loss(l, t) for l, t in zip(logits, targets)]).mean()
    return bce_weight * bce + dice_weight * dice, bce, dice


def lr_factor(step: int, *, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------ one step
def pad_text(texts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged ``T_i x D`` phrase embeddings -> ``B x T x D`` plus a validity mask (as ``encode_phrases``)."""
    width = max(t.shape[0] for t in texts)
    out = torch.zeros((len(texts), width, texts[0].shape[-1]))
    mask = torch.zeros((len(texts), width), dtype=torch.bool)
    for row, text in enumerate(texts):
        out[row, : text.shape[0]] = text
        mask[row, : text.shape[0]] = True
    return out, mask


def predict_logits(adapters: MultiScaleAdapters, sam: FrozenSAM, features: Sequence[SamImageFeatures],
                   texts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Adapter -> frozen decoder -> logits at each image's original size (``H x W`` each), differentiable."""
    from llavaseg.routes.llavaseg import adapter_mask_logits

    device = sam.device
    features = [f.to(device) for f in features]
    text, text_mask = pad_text(texts)
    low_res, _ = adapter_mask_logits(adapters, sam, list(features), text, text_mask)
    return [sam.upscale(low_res[i: i + 1], f)[0, 0] for i, f in enumerate(features)]


def adapter_train_step(adapters: MultiScaleAdapters, sam: FrozenSAM, optimizer: torch.optim.Optimizer,
                       features: Sequence[SamImageFeatures], texts: Sequence[torch.Tensor],
                       masks: Sequence[np.ndarray | torch.Tensor], *, bce_weight: float = 2.0,
                       dice_weight: float = 0.5, grad_clip: float | None = 1.0,
                       scheduler: Any = None) -> tuple[float, float, float]:
    """One optimiser step on a batch of cached samples; returns ``(loss, bce, dice)`` as floats.

    Public so ``benchmarks/train_step.py`` can time exactly what training does.
    """
    adapters.train()
    logits = predict_logits(adapters, sam, features, texts)
    device_masks = [torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m).to(sam.device)
                    for m in masks]
    loss, bce, dice = mask_loss(logits, device_masks, bce_weight=bce_weight, dice_weight=dice_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None and grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(adapters.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach()), float(bce.detach()), float(dice.detach())


@torch.no_grad()
def evaluate_cached(adapters: MultiScaleAdapters, sam: FrozenSAM, cache: FeatureCache,
                    samples: Sequence[CachedSample], *, use_attributes: bool = True,
                    batch_size: int = 16) -> dict[str, SplitMetrics]:
    """gIoU/cIoU (shared evaluator) of the adapters on cached samples; description only if not ``use_attributes``."""
    was_training = adapters.training
    adapters.eval()
    accumulator = MetricAccumulator()
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start: start + batch_size]
            features = [cache.image_features(s.entry.image) for s in chunk]
            texts = [s.text if use_attributes else s.text[:1] for s in chunk]
            logits = predict_logits(adapters, sam, features, texts)
            for sample, logit in zip(chunk, logits):
                entry = sample.entry
                accumulator.add_masks((logit > sam.sam.mask_threshold).cpu().numpy(), sample.mask,
                                      query_id=entry.query_id, is_sentence=entry.is_sentence,
                                      sample=entry.sample_id, text_index=entry.text_index)
    finally:
        adapters.train(was_training)
    return accumulator.result()


# ----------------------------------------------------------------------------------------------- checkpoint


def _config_for_resume(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in _RESUME_FREE}


def save_checkpoint(directory: Path, *, step: int, config: TrainConfig, adapters: MultiScaleAdapters,
                    optimizer: torch.optim.Optimizer, scheduler: Any, rng: np.random.Generator,
                    state: dict[str, Any]) -> Path:
    """Tensors (adapters, optimizer moments, torch RNG) to safetensors, the rest to JSON; JSON last = commit."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"adapters/{k}": v.detach().cpu().contiguous() for k, v in adapters.state_dict().items()}
    optim_state = optimizer.state_dict()
    for index, slots in optim_state["state"].items():
        for name, value in slots.items():
            tensors[f"optim/{index}/{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    tensor_file = f"state-{step:08d}.safetensors"
    atomic_write(directory / tensor_file, lambda p: save_file(tensors, str(p), metadata={"format": "llavaseg-train"}))
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    payload = {
        "format": CHECKPOINT_FORMAT, "step": step, "tensors": tensor_file,
        "config": _config_for_resume(config), "optimizer_groups": optim_state["param_groups"],
        "scheduler": scheduler_state, "numpy_rng": rng.bit_generator.state, **state,
    }
    atomic_write(directory / "checkpoint.json", lambda p: p.write_text(json.dumps(payload, indent=1, default=str)))
    for old in directory.glob("state-*.safetensors"):
        if old.name != tensor_file:
            old.unlink(missing_ok=True)
    return directory / "checkpoint.json"


def load_checkpoint(directory: Path, *, config: TrainConfig, adapters: MultiScaleAdapters,
                    optimizer: torch.optim.Optimizer, scheduler: Any, rng: np.random.Generator) -> dict[str, Any] | None:
    """Restore everything :func:`save_checkpoint` wrote; refuse a checkpoint of a different run."""
    path = directory / "checkpoint.json"
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointMismatchError(f"{path}: unreadable training checkpoint ({exc})") from None
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(f"{path}: checkpoint format {payload.get('format')}, expected {CHECKPOINT_FORMAT}")
    wanted, recorded = _config_for_resume(config), payload.get("config", {})
    differs = sorted(k for k in set(wanted) | set(recorded) if wanted.get(k) != recorded.get(k))
    if differs:
        raise CheckpointMismatchError(
            f"checkpoint {path} belongs to a run with different settings ({', '.join(differs)}); "
            "use another --checkpoint-dir or --no-resume to start over")
    tensors = load_file(str(directory / payload["tensors"]))
    adapters.load_state_dict({k[len("adapters/"):]: v for k, v in tensors.items() if k.startswith("adapters/")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": payload["optimizer_groups"]})
    scheduler.load_state_dict({**payload["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    torch.set_rng_state(tensors["rng/torch"])
    rng.bit_generator.state = payload["numpy_rng"]
    return payload


# -------------------------------------------------------------------------------------------------- running
def _default_checkpoint_dir(config: TrainConfig) -> Path:
    tag = hashlib.blake2b(str(Path(config.out).absolute()).encode(), digest_size=4).hexdigest()
    return default_cache_root().parent / "runs" / f"{Path(config.out).name}-{tag}"


def _open_dataset(source: DataSource) -> Any:
    if source.kind == "reasonseg":
        from llavaseg.data.reasonseg import ReasonSegDataset

        return ReasonSegDataset(source.path, source.split)
    if source.kind == "refcoco":
        from llavaseg.data.refcoco import RefCocoDataset

        return RefCocoDataset(source.path, source.refcoco_dataset, source.split_by, source.split)
    from llavaseg.data.jsonl import JsonlDataset

    return JsonlDataset(source.path)


def _train_sources(config: TrainConfig) -> list[DataSource]:
    if config.mixture:
        if config.data is not None:
            raise InputError("give either `data` or `mixture`, not both")
        return list(config.mixture)
    return [DataSource(kind="reasonseg", path=_data_root(config), split=config.split)]


def _data_root(config: TrainConfig) -> Path:
    if config.data is not None:
        return Path(config.data)
    if config.preset == "tiny-world":
        from llavaseg.data.tinyworld.generate import default_tinyworld_root

        return default_tinyworld_root()
    raise InputError(f"preset {config.preset!r} has no default data set; pass --data DIR")


class _Frozen:
    """The frozen models a run needs (the MLLM only when stage outputs come from it)."""

    def __init__(self, config: TrainConfig) -> None:
        from llavaseg.models.presets import PRESETS, build_mllm, build_sam, build_text_encoder

        if config.preset not in PRESETS:
            raise InputError(f"unknown preset {config.preset!r}; available: {', '.join(PRESETS)}")
        self.preset = PRESETS[config.preset]
        self.sam = build_sam(self.preset.sam_type, self.preset.sam_checkpoint, device=config.device)
        self.text_encoder = build_text_encoder(self.preset.clip_model, self.preset.clip_pretrained, device=config.device)
        self.mllm = None
        self.prompts = None
        if config.stage_source == "mllm":
            from llavaseg.prompting import PromptSet

            self.mllm = build_mllm(self.preset.mllm, device=config.device, dtype="auto", quantization=None)
            self.prompts = PromptSet.load()


def _log(config: TrainConfig, message: str) -> None:
    if config.progress:
        from tqdm.auto import tqdm

        tqdm.write(message)


def train_adapters(config: TrainConfig, *, stop_after: int | None = None, frozen: Any = None) -> TrainResult:
    """Build/resume the feature cache, train (or resume training) the adapters, validate, save.

    ``stop_after`` ends the run after that many optimiser steps *of this call* with a checkpoint and no final
    adapters (an interruption; the next call resumes). ``frozen`` may pass already-built frozen models
    (an object with ``sam``, ``text_encoder``, ``mllm``, ``prompts``, ``preset``) to skip rebuilding them.
    """
    from llavaseg.models.presets import new_adapters

    wall_start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    frozen = frozen or _Frozen(config)
    sam, text_encoder = frozen.sam, frozen.text_encoder
    preset = frozen.preset

    # --- adapters first (seeded), so the cache identity knows max_text_tokens
    adapters = new_adapters(sam, text_encoder, dim=config.adapter_dim or preset.adapter_dim,
                            heads=config.adapter_heads or preset.adapter_heads,
                            scales=tuple(config.adapter_scales or preset.adapter_scales), seed=config.seed)
    identity = cache_identity(sam, text_encoder, max_text_tokens=adapters.config.max_text_tokens,
                              stage_source=config.stage_source, mllm=frozen.mllm, prompts=frozen.prompts)
    cache = FeatureCache(config.cache_dir or default_cache_root(), identity,
                         on_mismatch="namespace" if config.cache_namespace else "error")
    _log(config, f"feature cache: {cache.dir}")

    # --- cache (resumable)
    cache_start = time.perf_counter()

    def cached_keys(dataset: Any, label: str) -> list[str]:
        teacher = TeacherStages.for_dataset(dataset) if config.stage_source == "teacher" else None
        return build_cache(cache, dataset.queries(), sam=sam, text_encoder=text_encoder, mllm=frozen.mllm,
                           prompts=frozen.prompts, teacher=teacher, batch_size=config.cache_batch_size,
                           progress=config.progress, desc=f"cache {label}")

    sources = _train_sources(config)
    train_keys = [cached_keys(_open_dataset(s), f"{s.kind}:{s.split}") for s in sources]
    val_samples: list[CachedSample] = []
    if config.val_split:
        from llavaseg.data.reasonseg import ReasonSegDataset

        val_root = config.val_data or (config.data if not config.mixture else None) or (
            _data_root(config) if not config.mixture else None)
        if val_root is None:
            raise InputError("with a mixture, pass val_data (a ReasonSeg-format root) or val_split=None")
        val_dataset = ReasonSegDataset(val_root, config.val_split, first_text_only=config.val_first_text_only)
        val_samples = cache.load_samples(cached_keys(val_dataset, f"val:{config.val_split}"))
    cache.flush()
    cache_seconds = time.perf_counter() - cache_start

    mixture: Mixture[str] = Mixture([(keys, s.rate) for keys, s in zip(train_keys, sources)], seed=config.seed,
                                    names=[f"{s.kind}:{s.path.name}/{s.split}" for s in sources])
    store: dict[str, CachedSample] = {}

    def samples_for(keys: list[str]) -> list[CachedSample]:
        missing = [k for k in dict.fromkeys(keys) if k not in store]
        if missing:
            store.update(zip(missing, cache.load_samples(missing)))
        return [store[k] for k in keys]

    # --- optimiser, schedule, RNG, resume
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=config.warmup_steps, total=config.steps, schedule=config.schedule))
    rng = np.random.default_rng([config.seed, 7])
    checkpoint_dir = Path(config.checkpoint_dir or _default_checkpoint_dir(config))
    losses: list[LossPoint] = []
    val_history: list[ValPoint] = []
    start_step, resumed_from, previous_train_seconds = 0, None, 0.0
    if config.resume:
        payload = load_checkpoint(checkpoint_dir, config=config, adapters=adapters, optimizer=optimizer,
                                  scheduler=scheduler, rng=rng)
        if payload is not None:
            start_step = resumed_from = int(payload["step"])
            losses = [LossPoint.model_validate(p) for p in payload.get("losses", [])]
            val_history = [ValPoint.model_validate(p) for p in payload.get("val_history", [])]
            previous_train_seconds = float(payload.get("train_seconds", 0.0))
            _log(config, f"resuming from {checkpoint_dir} at step {start_step}")

    def validate(step: int) -> ValPoint | None:
        if not val_samples:
            return None
        full = evaluate_cached(adapters, sam, cache, val_samples)["overall"]
        bare = evaluate_cached(adapters, sam, cache, val_samples, use_attributes=False)["overall"]
        point = ValPoint(step=step, giou=full.giou, ciou=full.ciou, giou_noattr=bare.giou, ciou_noattr=bare.ciou,
                         n_queries=full.n_queries)
        if not val_history or val_history[-1].step != step:
            val_history.append(point)
        _log(config, f"step {step}: val gIoU {full.giou:.4f} cIoU {full.ciou:.4f} "
                     f"(description only: gIoU {bare.giou:.4f} cIoU {bare.ciou:.4f})")
        return point

    def checkpoint(step: int, train_seconds: float) -> None:
        save_checkpoint(checkpoint_dir, step=step, config=config, adapters=adapters, optimizer=optimizer,
                        scheduler=scheduler, rng=rng,
                        state={"losses": [p.model_dump() for p in losses],
                               "val_history": [p.model_dump() for p in val_history],
                               "train_seconds": train_seconds})

    # --- loop
    from tqdm.auto import tqdm

    if start_step == 0 and val_samples:
        validate(0)  # the untrained baseline, so every card shows what training bought
    adapters.train()
    train_start = time.perf_counter()
    step = start_step
    stopped_early = False
    window: list[tuple[float, float, float]] = []
    bar = tqdm(total=config.steps, initial=start_step, desc="training adapters", unit="step",
               disable=not config.progress, leave=False)
    try:
        while step < config.steps:
            if stop_after is not None and step - start_step >= stop_after:
                stopped_early = True
                break
            batch = samples_for(mixture.batch(step, config.batch_size))
            keep = rng.random(len(batch)) >= config.attribute_dropout  # always drawn: same RNG stream either way
            features = [cache.image_features(s.entry.image) for s in batch]
            texts = [s.text if k else s.text[:1] for s, k in zip(batch, keep)]
            lr = optimizer.param_groups[0]["lr"]
            loss = adapter_train_step(adapters, sam, optimizer, features, texts, [s.mask for s in batch],
                                      bce_weight=config.bce_weight, dice_weight=config.dice_weight,
                                      grad_clip=config.grad_clip, scheduler=scheduler)
            step += 1
            window.append(loss)
            bar.update(1)
            log_every = max(1, min(50, config.steps // 20))
            if step % log_every == 0 or step == config.steps:
                mean = np.mean(np.asarray(window), axis=0)
                losses.append(LossPoint(step=step, loss=float(mean[0]), bce=float(mean[1]), dice=float(mean[2]), lr=lr))
                bar.set_postfix(loss=f"{mean[0]:.4f}")
                window.clear()
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                validate(step)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                checkpoint(step, previous_train_seconds + time.perf_counter() - train_start)
    finally:
        bar.close()
    train_seconds = previous_train_seconds + time.perf_counter() - train_start
    steps_this_call = step - start_step
    step_seconds = (time.perf_counter() - train_start) / steps_this_call if steps_this_call else None
    checkpoint(step, train_seconds)

    final: ValPoint | None = None
    out: Path | None = None
    if not stopped_early:
        final = validate(step)
        out = Path(config.out)
        card = {
            "name": out.name,
            "trained_with": "llavaseg.train.train_adapters",
            "preset": config.preset,
            "data": [s.model_dump(mode="json") for s in sources],
            "val": {"data": str(config.val_data or config.data or "(default)"), "split": config.val_split,
                    "first_text_only": config.val_first_text_only,
                    "n_queries": len(val_samples),
                    **({"giou": final.giou, "ciou": final.ciou, "giou_description_only": final.giou_noattr,
                        "ciou_description_only": final.ciou_noattr} if final else {})},
            "steps": config.steps, "batch_size": config.batch_size, "seed": config.seed,
            "stage_source": config.stage_source,
            "n_train_queries": sum(len(k) for k in train_keys),
            "parameter_count": adapters.num_parameters(),
            "train_wall_seconds": round(train_seconds, 1),
            "cache_build_seconds_this_run": round(cache_seconds, 1),
            "final_loss": losses[-1].model_dump() if losses else None,
            "loss_curve": [p.model_dump() for p in losses[:: max(1, len(losses) // 20)]],
            "val_history": [p.model_dump() for p in val_history],
            "config": config.model_dump(mode="json"),
            "frozen_models": identity.model_dump(mode="json"),
            "torch": torch.__version__, "python": platform.python_version(),
        }
        save_adapters(adapters, out, card)
        atomic_write(out / "README.md", lambda p: p.write_text(_readme(card)))
        _log(config, f"adapters written to {out}")
    return TrainResult(
        out=out, checkpoint_dir=checkpoint_dir, completed=not stopped_early, step=step, steps=config.steps,
        parameter_count=adapters.num_parameters(), losses=losses, val_history=val_history, val=final,
        resumed_from=resumed_from, cache_seconds=cache_seconds, train_seconds=train_seconds,
        wall_seconds=time.perf_counter() - wall_start, step_seconds=step_seconds,
        n_train_queries=sum(len(k) for k in train_keys), n_val_queries=len(val_samples))


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _readme(card: dict[str, Any]) -> str:
    val = card["val"]
    untrained = next((p for p in card["val_history"] if p["step"] == 0), {})
    first, last = (card["loss_curve"][0] if card["loss_curve"] else None), card["final_loss"]
    return (
        f"# Adapters `{card['name']}`\n\n"
        "Multi-scale adapters of the LLaVASeg-style route (the only trainable part; MLLM, text encoder and SAM "
        "are frozen). Load with `Segmenter.from_preset(..., adapters=DIR)` or a preset naming this folder.\n\n"
        f"- preset: `{card['preset']}`; stage outputs: `{card['stage_source']}`\n"
        f"- data: {', '.join(d['path'] + ':' + d['split'] + ' @' + str(d['rate']) for d in card['data'])} "
        f"({card['n_train_queries']} queries)\n"
        f"- steps: {card['steps']} x batch {card['batch_size']}, seed {card['seed']}, "
        f"{card['train_wall_seconds']} s training wall time\n"
        f"- trainable parameters: {card['parameter_count']:,}\n"
        f"- loss: {first['loss'] if first else float('nan'):.4f} (step {first['step'] if first else 0}) -> "
        f"{last['loss'] if last else float('nan'):.4f} (step {last['step'] if last else 0})\n"
        f"- val ({val['split']}, {val['n_queries']} queries, first text per image): gIoU {_fmt(val.get('giou'))}, "
        f"cIoU {_fmt(val.get('ciou'))}; description only: gIoU {_fmt(val.get('giou_description_only'))}, "
        f"cIoU {_fmt(val.get('ciou_description_only'))} (cached frozen features, LISA metrics, %)\n"
        f"- untrained (step 0) adapters on the same val: gIoU {_fmt(untrained.get('giou'))}, "
        f"cIoU {_fmt(untrained.get('ciou'))}\n\n"
        "Full details (config, frozen model identities, loss curve, validation history) are in `card.json`.\n"
    )
