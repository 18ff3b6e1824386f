"""Train the multi-scale adapters on cached frozen features (the only trainable part of the LLaVASeg route).

    >>> from llavaseg.train import TrainConfig, train_adapters
    >>> result = train_adapters(TrainConfig(preset="tiny-world", steps=2000, out="adapters/tiny-world"))
    >>> result.val.giou, result.val.ciou

Pipeline: build (or resume) the feature cache for the train and val splits (:mod:`llavaseg.cache`), then
run AdamW on the adapters alone. The frozen models stay in ``eval()`` with ``requires_grad=False``:
gradients reach the adapters *through* SAM's frozen mask decoder (``adapter_mask_logits``) but no frozen
parameter ever gets a ``.grad`` or changes (``tests/test_frozen.py`` checks it bit for bit).

Loss (LISA, ``model/LISA.py``; ``docs/lisa.md`` §3), on logits upsampled to the **original ground-truth
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llavaseg.atomic import writable_dir
from llavaseg.cache import (
    CachedSample,
    FeatureCache,
    build_cache,
    cache_identity,
    default_cache_root,
)
from llavaseg.data.annotations import GroundTruthStages
from llavaseg.data.mixture import Mixture
from llavaseg.data.registry import DataSource, open_dataset
from llavaseg.distributed import World, barrier, shard, world
from llavaseg.errors import CheckpointMismatchError, InputError
from llavaseg.models.adapters import MultiScaleAdapters, save_adapters
from llavaseg.paths import cache_dir
from llavaseg.tinyworld.generate import default_tiny_world_source
from llavaseg.train.card import adapter_card, write_card
from llavaseg.train.config import (
    RESUME_FREE_FIELDS,
    LossPoint,
    TrainConfig,
    TrainResult,
    ValPoint,
)
from llavaseg.train.interrupt import DeferredInterrupt
from llavaseg.train.schedule import lambda_scheduler
from llavaseg.train.state import load_state, save_state
from llavaseg.train.step import adapter_train_step
from llavaseg.train.validate import evaluate_cached

__all__ = ["FrozenModels", "train_adapters", "resume_identity"]


class FrozenModels:
    """The frozen models a run needs (the MLLM and prompts only when stage outputs come from it)."""

    def __init__(self, config: TrainConfig) -> None:
        from llavaseg.models.components import (
            build_mllm,
            build_sam,
            check_spec,
            open_text_encoder,
        )
        from llavaseg.models.presets import get_preset

        self.preset = get_preset(config.preset)
        self.spec = config.components or self.preset.spec()
        check_spec(self.spec)
        self.sam = build_sam(self.spec.sam, device=config.device)
        self.text_encoder = open_text_encoder(self.spec.clip, device=config.device)
        self.mllm = None
        self.prompts = None
        if config.stage_source == "mllm":
            from llavaseg.prompting import PromptSet

            self.mllm = build_mllm(self.spec.mllm, device=config.device, dtype="auto", quantization=None)
            self.prompts = PromptSet.load(config.prompts_dir)


def _start_from(adapters: MultiScaleAdapters, source: Path, frozen: Any) -> None:
    """Initialise from trained adapters (fine-tuning): they must fit these frozen models and this architecture."""
    from llavaseg.models.adapters import load_adapters

    trained = load_adapters(source, sam_identity=frozen.sam.identity(),
                            text_encoder_identity=frozen.text_encoder.identity())
    if trained.config.model_dump(exclude={"sam_identity", "text_encoder_identity"}) != adapters.config.model_dump(
            exclude={"sam_identity", "text_encoder_identity"}):
        raise CheckpointMismatchError(f"--adapters {source}: another architecture than this run's adapters "
                                      f"({trained.config.dim}-d x {trained.config.scales} vs {adapters.config.dim}-d "
                                      f"x {adapters.config.scales})")
    adapters.load_state_dict(trained.state_dict())


def _log(config: TrainConfig, message: str) -> None:
    if config.progress:
        from tqdm.auto import tqdm

        tqdm.write(message)


def resume_identity(config: TrainConfig, data: _Data | None = None, initial: str | None = None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: every setting that changes the trained weights and, once the
    data are known, what produced the run: the training and validation queries (their content keys: image
    pixels, text, mask and annotation digests, in order), the frozen models and prompts (the cache identity)
    and the adapters' starting weights (fingerprint: covers ``init_adapters`` whose file may have changed)."""
    identity: dict[str, Any] = {k: v for k, v in config.model_dump(mode="json").items()
                                if k not in RESUME_FREE_FIELDS}
    if data is not None:
        keys = hashlib.blake2b(digest_size=12)
        for part in [*data.train_keys, [s.entry.key for s in data.val_samples]]:
            keys.update("\n".join(reference.partition("#")[2] for reference in part).encode() + b"\0")
        identity |= {"data": keys.hexdigest(), "frozen_models": data.cache.identity.digest()}
    if initial is not None:
        identity["initial_adapters"] = initial
    return identity


def _default_checkpoint_dir(config: TrainConfig) -> Path:
    tag = hashlib.blake2b(str(Path(config.out).absolute()).encode(), digest_size=4).hexdigest()
    return cache_dir("runs", f"{Path(config.out).name}-{tag}")


# ------------------------------------------------------------------------------------------------- data
def _train_sources(config: TrainConfig) -> list[DataSource]:
    if config.mixture:
        if config.data is not None:
            raise InputError("give either `data` or `mixture`, not both")
        return list(config.mixture)
    if config.data is not None:
        return [DataSource(kind="reasonseg", path=config.data, split=config.split)]
    if config.preset == "tiny-world":
        return [default_tiny_world_source(config.split)]
    raise InputError(f"preset {config.preset!r} has no default data set; pass --data DIR")


def _val_source(config: TrainConfig, sources: list[DataSource]) -> DataSource | None:
    if config.validation is not None:
        return config.validation
    if not config.val_split:
        return None
    root = config.val_data or (None if config.mixture else sources[0].path)
    if root is None:
        raise InputError("with a mixture, pass val_data (a ReasonSeg-format root), validation, or val_split=None")
    return DataSource(kind="reasonseg", path=root, split=config.val_split,
                      first_text_only=config.val_first_text_only)


@dataclass
class _Data:
    """The cache and what training and validation read from it."""

    cache: FeatureCache
    sources: list[DataSource]
    train_keys: list[list[str]]
    val_samples: list[CachedSample]
    cache_seconds: float
    store: dict[str, CachedSample] = field(default_factory=dict)

    def samples(self, keys: list[str]) -> list[CachedSample]:
        missing = [k for k in dict.fromkeys(keys) if k not in self.store]
        if missing:
            self.store.update(zip(missing, self.cache.load_samples(missing)))
        return [self.store[k] for k in keys]

    def mixture(self, seed: int) -> Mixture[str]:
        return Mixture([(keys, s.rate) for keys, s in zip(self.train_keys, self.sources)], seed=seed,
                       names=[f"{s.kind}:{s.path.name}/{s.split}" for s in self.sources])


def _prepare_data(config: TrainConfig, frozen: Any, adapters: MultiScaleAdapters, place: World = World()) -> _Data:
    """Open (and fill, resumably) the feature cache for the training sources and the validation split. In a
    distributed run each rank computes its share of the cache chunks, then all read all of them."""
    identity = cache_identity(frozen.sam, frozen.text_encoder, max_text_tokens=adapters.config.max_text_tokens,
                              stage_source=config.stage_source, mllm=frozen.mllm, prompts=frozen.prompts)
    cache = FeatureCache(config.cache_dir or default_cache_root(), identity,
                         on_mismatch="namespace" if config.cache_namespace else "error")
    _log(config, f"feature cache: {cache.dir}")
    start = time.perf_counter()

    def cached_keys(dataset: Any, label: str) -> list[str]:
        ground_truth = GroundTruthStages.for_dataset(dataset) if config.stage_source == "teacher" else None
        return build_cache(cache, dataset.queries(), sam=frozen.sam, text_encoder=frozen.text_encoder,
                           mllm=frozen.mllm, prompts=frozen.prompts, ground_truth=ground_truth,
                           batch_size=config.cache_batch_size, progress=config.progress and place.is_main,
                           desc=f"cache {label}", shard=(place.rank, place.size))

    sources = _train_sources(config)
    train_keys = [cached_keys(open_dataset(s), f"{s.kind}:{s.split}") for s in sources]
    val = _val_source(config, sources)
    val_keys = cached_keys(open_dataset(val), f"val:{val.split}") if val else []
    barrier(place)  # every rank's chunks are committed
    cache.refresh()
    val_samples = cache.load_samples(val_keys) if val and place.is_main else []
    return _Data(cache, sources, train_keys, val_samples, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------- the run
@dataclass
class _Run:
    """Optimiser, schedule, RNG and histories of one run: everything a checkpoint saves."""

    config: TrainConfig
    adapters: MultiScaleAdapters
    optimizer: torch.optim.Optimizer
    scheduler: Any
    rng: np.random.Generator
    checkpoint_dir: Path
    identity: dict[str, Any]
    losses: list[LossPoint] = field(default_factory=list)
    val_history: list[ValPoint] = field(default_factory=list)
    start_step: int = 0
    resumed_from: int | None = None
    previous_train_seconds: float = 0.0

    @classmethod
    def create(cls, config: TrainConfig, adapters: MultiScaleAdapters, data: _Data) -> _Run:
        optimizer = torch.optim.AdamW(adapters.parameters(), lr=config.lr, betas=config.betas,
                                      weight_decay=config.weight_decay)
        scheduler = lambda_scheduler(optimizer, warmup=config.warmup_steps, total=config.steps,
                                     schedule=config.schedule)
        return cls(config, adapters, optimizer, scheduler, np.random.default_rng([config.seed, 7]),
                   Path(config.checkpoint_dir or _default_checkpoint_dir(config)),
                   resume_identity(config, data, adapters.fingerprint()))

    def resume(self) -> None:
        resumed = load_state(self.checkpoint_dir, identity=self.identity, optimizer=self.optimizer,
                             scheduler=self.scheduler, numpy_rng=self.rng)
        if resumed is None:
            return
        self.adapters.load_state_dict(resumed.model)
        self.start_step = self.resumed_from = resumed.step
        self.losses = [LossPoint.model_validate(p) for p in resumed.extra.get("losses", [])]
        self.val_history = [ValPoint.model_validate(p) for p in resumed.extra.get("val_history", [])]
        self.previous_train_seconds = float(resumed.extra.get("train_seconds", 0.0))
        _log(self.config, f"resuming from {self.checkpoint_dir} at step {resumed.step}")

    def checkpoint(self, step: int, train_seconds: float) -> None:
        save_state(self.checkpoint_dir, step=step, identity=self.identity,
                   model=self.adapters.state_dict(), optimizer=self.optimizer, scheduler=self.scheduler,
                   numpy_rng=self.rng, extra={"losses": [p.model_dump() for p in self.losses],
                                              "val_history": [p.model_dump() for p in self.val_history],
                                              "train_seconds": train_seconds})

    def validate(self, step: int, data: _Data, sam: Any) -> ValPoint | None:
        if not data.val_samples:
            return None
        full = evaluate_cached(self.adapters, sam, data.cache, data.val_samples)["overall"]
        bare = evaluate_cached(self.adapters, sam, data.cache, data.val_samples, use_attributes=False)["overall"]
        point = ValPoint(step=step, giou=full.giou, ciou=full.ciou, giou_noattr=bare.giou, ciou_noattr=bare.ciou,
                         n_queries=full.n_queries)
        if not self.val_history or self.val_history[-1].step != step:
            self.val_history.append(point)
        _log(self.config, f"step {step}: val gIoU {full.giou:.4f} cIoU {full.ciou:.4f} "
                          f"(description only: gIoU {bare.giou:.4f} cIoU {bare.ciou:.4f})")
        return point


def _train_loop(run: _Run, data: _Data, sam: Any, stop_after: int | None,
                interrupt: DeferredInterrupt, place: World = World()) -> tuple[int, bool, float]:
    """Optimiser steps from ``run.start_step``; returns (last step, stopped early, seconds of this call).
    Stops early after ``stop_after`` steps or, after a complete step, when Ctrl-C was pressed.

    Distributed: every rank draws the same global batch and dropout mask and takes every ``size``-th sample;
    DistributedDataParallel averages the gradients, so the step equals one process's on the whole batch (the
    losses are means over the batch); only rank 0 validates and checkpoints."""
    from tqdm.auto import tqdm

    config = run.config
    mixture = data.mixture(config.seed)
    run.adapters.train()
    model = _parallel(run.adapters, place)
    train_start = time.perf_counter()
    step, stopped_early, window = run.start_step, False, []
    log_every = max(1, min(50, config.steps // 20))
    with tqdm(total=config.steps, initial=run.start_step, desc="training adapters", unit="step",
              disable=not config.progress, leave=False) as bar:
        while step < config.steps:
            if interrupt.requested or (stop_after is not None and step - run.start_step >= stop_after):
                stopped_early = True
                break
            keys = mixture.batch(step, config.batch_size)
            keep = run.rng.random(len(keys)) >= config.attribute_dropout  # always drawn: same RNG stream either way
            batch, keep = data.samples(shard(keys, place)), shard(list(keep), place)
            features = [data.cache.image_features(s.entry.image) for s in batch]
            texts = [s.text if k else s.text[:1] for s, k in zip(batch, keep)]
            lr = run.optimizer.param_groups[0]["lr"]
            losses = adapter_train_step(model, sam, run.optimizer, features, texts, [s.mask for s in batch],
                                        bce_weight=config.bce_weight, dice_weight=config.dice_weight,
                                        grad_clip=config.grad_clip, scheduler=run.scheduler)
            window.append(_mean_over_ranks(losses, place))
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == config.steps:
                mean = np.mean(np.asarray(window), axis=0)
                run.losses.append(LossPoint(step=step, loss=float(mean[0]), bce=float(mean[1]), dice=float(mean[2]),
                                            lr=lr))
                bar.set_postfix(loss=f"{mean[0]:.4f}")
                window.clear()
            if config.eval_every and step % config.eval_every == 0 and step < config.steps and place.is_main:
                run.validate(step, data, sam)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                if place.is_main:
                    run.checkpoint(step, run.previous_train_seconds + time.perf_counter() - train_start)
                barrier(place)
    return step, stopped_early, time.perf_counter() - train_start


def _parallel(adapters: MultiScaleAdapters, place: World) -> torch.nn.Module:
    """The module a step runs: the adapters, wrapped in DistributedDataParallel when there are several ranks."""
    if not place.distributed:
        return adapters
    from torch.nn.parallel import DistributedDataParallel

    device = next(adapters.parameters()).device
    return DistributedDataParallel(adapters, device_ids=[device.index] if device.type == "cuda" else None)


def _mean_over_ranks(losses: tuple[float, float, float], place: World) -> tuple[float, float, float]:
    """The step's losses over the whole global batch (each rank's are means over its equal share)."""
    if not place.distributed:
        return losses
    import torch.distributed as dist

    total = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(total)
    return tuple(float(v) for v in total / place.size)  # type: ignore[return-value]


def train_adapters(config: TrainConfig, *, stop_after: int | None = None, frozen: Any = None) -> TrainResult:
    """Build/resume the feature cache, train (or resume training) the adapters, validate, save.

    ``stop_after`` ends the run after that many optimiser steps *of this call* with a checkpoint and no final
    adapters (an interruption; the next call resumes). Ctrl-C does the same after the current step, then
    raises ``KeyboardInterrupt``. ``frozen`` may pass already-built frozen models
    (an object with ``sam``, ``text_encoder``, ``mllm``, ``prompts``, ``preset``) to skip rebuilding them.
    """
    from llavaseg.models.components import new_adapters

    wall_start = time.perf_counter()
    place = world(config.device)
    if config.batch_size % place.size:
        raise InputError(f"batch_size {config.batch_size} is not divisible by the {place.size} processes")
    writable_dir(Path(config.out), "out", create=False)  # before hours of training, not after
    writable_dir(Path(config.checkpoint_dir or _default_checkpoint_dir(config)), "checkpoint_dir")
    if config.threads:
        torch.set_num_threads(config.threads)
    frozen = frozen or FrozenModels(config)
    spec = getattr(frozen, "spec", None) or frozen.preset
    adapters = new_adapters(frozen.sam, frozen.text_encoder, dim=config.adapter_dim or spec.adapter_dim,
                            heads=config.adapter_heads or spec.adapter_heads,
                            scales=tuple(config.adapter_scales or spec.adapter_scales), seed=config.seed)
    if config.init_adapters is not None:
        _start_from(adapters, config.init_adapters, frozen)
    data = _prepare_data(config, frozen, adapters, place)
    run = _Run.create(config, adapters, data)
    if config.resume:
        run.resume()
    if run.start_step == 0 and data.val_samples:
        run.validate(0, data, frozen.sam)  # the untrained baseline, so every card shows what training bought
    with DeferredInterrupt() as interrupt:
        step, stopped_early, seconds = _train_loop(run, data, frozen.sam, stop_after, interrupt, place)
        train_seconds = run.previous_train_seconds + seconds
        steps_this_call = step - run.start_step
        if place.is_main:
            run.checkpoint(step, train_seconds)
    if interrupt.requested:
        _log(config, f"interrupted: step {step} checkpointed in {run.checkpoint_dir}")
        raise KeyboardInterrupt
    final, out = None, None
    n_train = sum(len(k) for k in data.train_keys)
    if not stopped_early and place.is_main:
        final = run.validate(step, data, frozen.sam)
        out = Path(config.out)
        save_adapters(adapters, out)
        write_card(out, adapter_card(config, sources=data.sources, final=final, n_val=len(data.val_samples),
                                     n_train=n_train, parameter_count=adapters.num_parameters(),
                                     train_seconds=train_seconds, cache_seconds=data.cache_seconds,
                                     losses=run.losses, val_history=run.val_history,
                                     frozen_models=data.cache.identity.model_dump(mode="json")))
        _log(config, f"adapters written to {out}")
    barrier(place)
    return TrainResult(
        out=out, checkpoint_dir=run.checkpoint_dir, completed=not stopped_early, step=step, steps=config.steps,
        parameter_count=adapters.num_parameters(), losses=run.losses, val_history=run.val_history, val=final,
        resumed_from=run.resumed_from, cache_seconds=data.cache_seconds, train_seconds=train_seconds,
        wall_seconds=time.perf_counter() - wall_start,
        step_seconds=seconds / steps_this_call if steps_this_call else None,
        n_train_queries=n_train, n_val_queries=len(data.val_samples))
