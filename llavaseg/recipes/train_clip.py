"""Pretrain the tiny-world open_clip model (image + text towers) contrastively, to be frozen afterwards.

Why: the LLaVASeg route embeds the MLLM's description and attribute phrases with a *frozen, pretrained*
open_clip text tower, and the training-free route scores SAM proposals with its image tower. No CLIP weights
can be downloaded here, so a small ``CLIP`` (``clip_configs/tinyworld-clip.json``: open_clip's
``ModifiedResNet`` image tower — CLIP's RN50 design, width 8, one bottleneck per stage, attention pooling — at
128 px; text transformer width 48 / 3 layers / context 32 with open_clip's default BPE tokenizer) is trained
from scratch on tiny-world objects, the way CLIP itself was trained: matched (image, caption) pairs, symmetric
InfoNCE over the batch.

Image side — the *frame view* (:func:`llavaseg.routes.training_free.proposal_view`): the whole 128 px scene
with every pixel outside one object's visible mask painted mid grey. A tight crop would hide the object's
position, and location is one of the attributes the text tower must separate; the frame view keeps the
geometry, so "location: top left" is learnable from pixels, honestly (nothing but the object and where it
is). It is also exactly what the training-free route shows CLIP for a SAM proposal, so train and use agree.
Masks are randomly eroded or dilated by a pixel or two (SAM proposals are not pixel-exact), and a sixteenth
of the batch are views of background-only regions captioned "background", so empty proposals do not look
like any object to the image tower.

Text side — the forms the LLaVASeg route embeds: the description alone (``circle``, ``the circle``), one
attribute phrase (``color: red``, ``location: top left``, ``size: large``, ``shape: circle``, as
:meth:`llavaseg.attributes.Attributes.phrases` writes them), and combined captions (``large red circle in the
top left``, ``the red shape``). A caption that names only some attributes is true of every object that has
them, so the loss uses *all* matching pairs in the batch as positives (soft targets), not just the diagonal.

Two fixes make shape and location learnable within a short budget: auxiliary linear attribute heads on the
joint embedding of both towers (training only, see :class:`AttributeHeads`), and a larger initial positional
embedding in the attention pool (``position_init_scale``); the measurements behind them, and the ViT tower
that was tried first, are in ``docs/tinyworld.md``.

Scenes come from a private seed stream (``[seed, 7, index]``, disjoint from the train/val/test/sam streams of
:mod:`llavaseg.tinyworld.generate`); accuracy is measured on the benchmark's val scenes. Every random choice of
step ``s`` is seeded from ``(seed, s)`` and checkpoints hold the optimizer moments, so a resumed run equals an
uninterrupted one. Weights are stored as float16 (the 49408-row token table dominates the file).

CLI: ``python -m llavaseg.recipes.train_clip --out llavaseg/weights/tinyworld/clip --steps 800``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from tqdm import tqdm

from llavaseg.atomic import atomic_write_text
from llavaseg.models.text_encoder import FrozenTextEncoder, save_local_dir
from llavaseg.paths import TINY_WORLD_WEIGHTS
from llavaseg.provenance import machine
from llavaseg.tinyworld.generate import scene_rng
from llavaseg.tinyworld.scenes import label_map, render_scene_array, sample_scene
from llavaseg.tinyworld.vocab import ATTRIBUTE_VALUES as TINY_WORLD_VALUES
from llavaseg.tinyworld.vocab import COLORS, LOCATIONS, SHAPES, SIZES
from llavaseg.train.schedule import warmup_cosine_lr
from llavaseg.train.state import load_state, save_state
from llavaseg.views import proposal_view

__all__ = [
    "MODEL_NAME",
    "WEIGHTS_DIR",
    "ATTRIBUTE_VALUES",
    "ClipTrainConfig",
    "RetrievalReport",
    "ClipTrainReport",
    "ScenePool",
    "caption_for",
    "caption_matches",
    "object_view",
    "evaluate_retrieval",
    "load_tiny_world_clip",
    "train_clip",
    "main",
]

MODEL_NAME = "tinyworld-clip"
WEIGHTS_DIR = TINY_WORLD_WEIGHTS / "clip"
HEAD_ORDER: tuple[str, ...] = ("color", "shape", "size", "location")
"""The order of the attribute heads and caption keys (it fixes the random initialisation and the RNG draws, so
it is part of what reproduces the shipped weights); the same four keys as
:data:`~llavaseg.attributes.ATTRIBUTE_KEYS`."""
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {key: TINY_WORLD_VALUES[key] for key in HEAD_ORDER}
_CLIP_STREAM = 7  # seed-stream id of the CLIP pretraining scenes (generate.SPLIT_CODES uses 0..3)
_BATCH_STREAM = 9
_MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
BACKGROUND = "background"


class ClipTrainConfig(BaseModel):
    """Everything that determines the trained weights (recorded next to them)."""

    model: str = MODEL_NAME
    steps: int = 800
    seed: int = 0
    pool_scenes: int = 3000
    batch: int = 96
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 60
    weight_decay: float = 0.02
    background_fraction: float = 1 / 16
    aux_weight: float = 1.0
    position_init_scale: float = 8.0
    checkpoint_every: int = 100


class RetrievalReport(BaseModel):
    """Zero-shot classification of val object views by nearest caption (cosine similarity)."""

    n_scenes: int
    n_objects: int
    phrase_accuracy: dict[str, float]  # attribute -> accuracy over "key: value" phrases
    word_accuracy: dict[str, float]  # attribute -> accuracy over the bare values ("red", "circle", ...)
    caption_accuracy: float  # exact match among all size x color x shape x location captions
    background_below_objects: float  # share of background views less similar to "circle" etc. than objects are
    text_margin: dict[str, float]  # attribute -> 1 - max cosine between phrases of different values


class ClipTrainReport(BaseModel):
    config: ClipTrainConfig
    n_params: int
    threads: int
    train_seconds: float
    final_loss: float
    file_bytes: int
    val: RetrievalReport
    torch_version: str
    open_clip_version: str
    machine: dict = Field(default_factory=dict)


# -------------------------------------------------------------------------------------------------- data


class ScenePool:
    """Rendered scenes with their label maps, sampled once (rendering is the slow part of a batch)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, objects: list[tuple[int, int, dict[str, str]]]):
        self.images, self.labels, self.objects = images, labels, objects

    @classmethod
    def build(cls, n_scenes: int, seed: int, *, stream: str | None = None, progress: bool = True) -> ScenePool:
        """``stream=None``: the private CLIP stream; ``"val"`` etc.: the benchmark split's scenes."""
        images = np.zeros((n_scenes, 128, 128, 3), dtype=np.uint8)
        labels = np.zeros((n_scenes, 128, 128), dtype=np.int8)
        objects: list[tuple[int, int, dict[str, str]]] = []
        for i in tqdm(range(n_scenes), desc="scenes", disable=not progress, mininterval=5):
            rng = np.random.default_rng([seed, _CLIP_STREAM, i]) if stream is None else scene_rng(stream, seed, i)
            scene = sample_scene(rng)
            images[i] = render_scene_array(scene)
            labels[i] = label_map(scene)
            for k, o in enumerate(scene.objects):
                if (labels[i] == k).any():
                    objects.append((i, k, {key: o.attributes()[key] for key in HEAD_ORDER}))
        return cls(images, labels, objects)


def caption_for(attrs: dict[str, str], rng: np.random.Generator) -> tuple[str, dict[str, str]]:
    """One caption of an object and the constraints it states (what any matching object must have)."""
    form = rng.random()
    if form < 0.2:  # the description alone, as stage 1 gives it
        return (attrs["shape"] if rng.random() < 0.6 else f"the {attrs['shape']}"), {"shape": attrs["shape"]}
    if form < 0.6:  # one attribute phrase, as Attributes.phrases() writes it
        key = HEAD_ORDER[int(rng.integers(len(HEAD_ORDER)))]
        return f"{key}: {attrs[key]}", {key: attrs[key]}
    keep = {"color": rng.random() < 0.8, "size": rng.random() < 0.5, "location": rng.random() < 0.5,
            "shape": rng.random() < 0.8}
    words = ["the"] if rng.random() < 0.5 else []
    words += [attrs[k] for k in ("size", "color") if keep[k]]
    words.append(attrs["shape"] if keep["shape"] else "shape")
    if keep["location"]:
        words += ["in", "the", attrs["location"]]
    return " ".join(words), {k: attrs[k] for k, v in keep.items() if v}


def caption_matches(constraints: dict[str, str], attrs: dict[str, str] | None) -> bool:
    """True if an object (``None`` = background) has every stated attribute."""
    if BACKGROUND in constraints:
        return attrs is None
    return attrs is not None and all(attrs.get(k) == v for k, v in constraints.items())


def object_view(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame view of one object, with the mask randomly eroded/dilated by up to 2 px when ``rng`` is given."""
    if rng is not None:
        r = rng.random()
        kernel = np.ones((3, 3), np.uint8)
        m = mask.astype(np.uint8)
        if r < 0.2:
            eroded = cv2.erode(m, kernel, iterations=1)
            m = eroded if eroded.sum() >= 8 else m
        elif r < 0.4:
            m = cv2.dilate(m, kernel, iterations=1)
        elif r < 0.5:
            m = cv2.dilate(m, kernel, iterations=2)
        mask = m.astype(bool)
    return proposal_view(image, mask, "frame")


def _background_view(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A blob of background pixels (no object), the kind of proposal a grid of points also produces."""
    h, w = labels.shape
    canvas = np.zeros((h, w), np.uint8)
    center = (int(rng.integers(10, w - 10)), int(rng.integers(10, h - 10)))
    axes = (int(rng.integers(6, 40)), int(rng.integers(6, 40)))
    cv2.ellipse(canvas, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    mask = canvas.astype(bool) & (labels < 0)
    if mask.sum() < 20:
        mask = labels < 0
    return proposal_view(image, mask, "frame")


def _to_tensor(views: list[np.ndarray]) -> torch.Tensor:
    """What open_clip's preprocess gives for a 128 px uint8 image (resize is the identity at 128 px)."""
    x = torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float() / 255.0
    return (x - _MEAN) / _STD


class Batch(NamedTuple):
    images: torch.Tensor  # B x 3 x 128 x 128, open_clip-normalised
    captions: list[str]
    match: torch.Tensor  # B x B: view i satisfies caption j
    image_attrs: list[dict[str, str] | None]  # None = background view
    caption_constraints: list[dict[str, str]]


def make_batch(pool: ScenePool, rng: np.random.Generator, batch: int, background_fraction: float) -> Batch:
    """Views, one caption per view, and the ``views x captions`` match matrix (soft-target positives)."""
    views, captions, constraints, attrs_list = [], [], [], []
    for _ in range(batch):
        if rng.random() < background_fraction:
            s = int(rng.integers(len(pool.images)))
            views.append(_background_view(pool.images[s], pool.labels[s], rng))
            captions.append(BACKGROUND)
            constraints.append({BACKGROUND: BACKGROUND})
            attrs_list.append(None)
            continue
        s, k, attrs = pool.objects[int(rng.integers(len(pool.objects)))]
        views.append(object_view(pool.images[s], pool.labels[s] == k, rng))
        text, cons = caption_for(attrs, rng)
        captions.append(text)
        constraints.append(cons)
        attrs_list.append(attrs)
    match = torch.tensor([[caption_matches(c, a) for c in constraints] for a in attrs_list], dtype=torch.float32)
    return Batch(_to_tensor(views), captions, match, attrs_list, constraints)


# -------------------------------------------------------------------------------------------------- loss


def multi_positive_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                             match: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every matching (view, caption) pair is a positive, weighted equally."""
    similarity = F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    logits = logit_scale.exp().clamp(max=100.0) * similarity
    image_targets = match / match.sum(dim=1, keepdim=True)
    text_targets = (match / match.sum(dim=0, keepdim=True)).T
    loss_i = -(image_targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(text_targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (loss_i + loss_t) / 2


class AttributeHeads(torch.nn.Module):
    """Training-only linear probes on the *normalised* joint embedding, one per attribute, for both towers.

    Contrastive loss alone learned colour and size within the step budget but left shape and location
    unseparated (their phrase embeddings collapsed to one vector). Supervising the joint embedding with the
    attribute labels the tiny world provides for free gives those attributes a direct gradient; the heads
    are discarded, only the CLIP weights ship.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, len(v)) for k, v in ATTRIBUTE_VALUES.items()})

    def loss(self, features: torch.Tensor, labels: list[dict[str, str] | None]) -> torch.Tensor:
        """Mean over attributes of the cross-entropy on the items that state that attribute."""
        features = 10.0 * F.normalize(features, dim=-1)
        terms = []
        for key, values in ATTRIBUTE_VALUES.items():
            rows = [i for i, lab in enumerate(labels) if lab is not None and key in lab]
            if rows:
                target = torch.tensor([values.index(labels[i][key]) for i in rows])
                terms.append(F.cross_entropy(self.heads[key](features[rows]), target))
        return torch.stack(terms).mean() if terms else features.sum() * 0.0

    @torch.no_grad()
    def accuracy(self, features: torch.Tensor, labels: list[dict[str, str] | None]) -> dict[str, float]:
        features = 10.0 * F.normalize(features, dim=-1)
        rows = [i for i, lab in enumerate(labels) if lab is not None]
        out = {}
        for key, values in ATTRIBUTE_VALUES.items():
            target = torch.tensor([values.index(labels[i][key]) for i in rows])
            out[key] = float((self.heads[key](features[rows]).argmax(1) == target).float().mean())
        return out


# ------------------------------------------------------------------------------------------------ measure


def _accuracy(image_emb: torch.Tensor, texts: list[str], encoder: FrozenTextEncoder, truth: list[int]) -> float:
    sims = image_emb @ encoder.encode_text(texts).T
    return float((sims.argmax(dim=1) == torch.tensor(truth)).float().mean())


def evaluate_retrieval(encoder: FrozenTextEncoder, n_scenes: int = 100, split: str = "val", seed: int = 0,
                       progress: bool = False) -> RetrievalReport:
    """Zero-shot nearest-caption accuracy on the frame views of every visible object of ``n_scenes`` scenes.

    Images go through ``FrozenTextEncoder.encode_images`` (open_clip's own preprocess), i.e. the inference path.
    """
    pool = ScenePool.build(n_scenes, seed, stream=split, progress=progress)
    views = [object_view(pool.images[s], pool.labels[s] == k) for s, k, _ in pool.objects]
    attrs = [a for _, _, a in pool.objects]
    emb = torch.cat([encoder.encode_images(views[i: i + 256]) for i in range(0, len(views), 256)])
    phrase_acc, word_acc, margins = {}, {}, {}
    for key, values in ATTRIBUTE_VALUES.items():
        truth = [values.index(a[key]) for a in attrs]
        phrases = [f"{key}: {v}" for v in values]
        phrase_acc[key] = _accuracy(emb, phrases, encoder, truth)
        word_acc[key] = _accuracy(emb, list(values), encoder, truth)
        text = encoder.encode_text(phrases)
        cos = text @ text.T - 2 * torch.eye(len(values))
        margins[key] = float(1 - cos.max())
    combos = [(sz, c, sh, loc) for sz in SIZES for c in COLORS for sh in SHAPES for loc in LOCATIONS]
    captions = [f"{sz} {c} {sh} in the {loc}" for sz, c, sh, loc in combos]
    truth = [combos.index((a["size"], a["color"], a["shape"], a["location"])) for a in attrs]
    caption_acc = _accuracy(emb, captions, encoder, truth)
    rng = np.random.default_rng([seed, 11])
    bg = encoder.encode_images([_background_view(pool.images[i % n_scenes], pool.labels[i % n_scenes], rng)
                                for i in range(min(64, n_scenes))])
    shape_text = encoder.encode_text(list(SHAPES))
    object_best = (emb @ shape_text.T).max(dim=1).values.median()
    below = float(((bg @ shape_text.T).max(dim=1).values < object_best).float().mean())
    return RetrievalReport(n_scenes=n_scenes, n_objects=len(views), phrase_accuracy=phrase_acc,
                           word_accuracy=word_acc, caption_accuracy=caption_acc, background_below_objects=below,
                           text_margin=margins)


# ------------------------------------------------------------------------------------------------ training


def load_tiny_world_clip(directory: Path | str | None = None) -> FrozenTextEncoder:
    """The shipped (or given) tiny-world CLIP, loaded strictly through ``local-dir:``, frozen."""
    directory = Path(directory) if directory is not None else WEIGHTS_DIR
    return FrozenTextEncoder.create(f"local-dir:{directory}")


def _report(out_dir: Path, config: ClipTrainConfig, model: torch.nn.Module, seconds: float, losses: list[float],
            eval_scenes: int) -> ClipTrainReport:
    """Reload the saved weights strictly (as users load them) and measure attribute retrieval on val."""
    loaded = load_tiny_world_clip(out_dir)
    return ClipTrainReport(
        config=config, n_params=sum(p.numel() for p in model.parameters()), threads=torch.get_num_threads(),
        train_seconds=seconds, final_loss=float(np.mean(losses[-20:])) if losses else float("nan"),
        file_bytes=(out_dir / "open_clip_model.safetensors").stat().st_size,
        val=evaluate_retrieval(loaded, eval_scenes), torch_version=torch.__version__,
        open_clip_version=open_clip.__version__, machine=machine())


def _batch_loss(model: torch.nn.Module, heads: AttributeHeads, encoder: FrozenTextEncoder, batch: Batch,
                config: ClipTrainConfig) -> torch.Tensor:
    """Multi-positive InfoNCE of one batch, plus the auxiliary attribute heads on both towers."""
    image_features = model.encode_image(batch.images)
    text_features = model.encode_text(encoder.tokenizer(batch.captions))
    loss = multi_positive_clip_loss(image_features, text_features, model.logit_scale, batch.match)
    if config.aux_weight > 0:
        loss = loss + config.aux_weight * (heads.loss(image_features, batch.image_attrs)
                                           + heads.loss(text_features, batch.caption_constraints))
    return loss


def train_clip(out_dir: Path | str, config: ClipTrainConfig | None = None, *, progress: bool = True,
               eval_scenes: int = 100) -> ClipTrainReport:
    """Train, save half-precision weights with ``save_local_dir`` into ``out_dir``, reload strictly, measure."""
    config = config or ClipTrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    encoder = FrozenTextEncoder.create(config.model, seed=config.seed)
    model = encoder.model.train()
    with torch.no_grad():
        # Location lives only in the attention pool's positional embedding, whose default initialisation is
        # drowned by the content features; a larger start makes location learnable (docs/tinyworld.md).
        model.visual.attnpool.positional_embedding.mul_(config.position_init_scale)
    for param in model.parameters():
        param.requires_grad_(True)
    heads = AttributeHeads(encoder.dim)
    trainable = torch.nn.ModuleDict({"clip": model, "heads": heads})
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    state_dir = out_dir.parent / f".{out_dir.name}-train.state"
    step, losses = 0, []
    resumed = load_state(state_dir, identity={"config": config.model_dump(mode="json")}, optimizer=optimizer)
    if resumed is not None:
        trainable.load_state_dict(resumed.model, strict=True)
        step, losses = resumed.step, list(resumed.extra["losses"])
    pool = ScenePool.build(config.pool_scenes, config.seed, progress=progress)
    probe_pool = ScenePool.build(24, config.seed, stream="val", progress=False)
    probe = make_batch(probe_pool, np.random.default_rng([config.seed, 13]), 96, 0.0)
    start = time.perf_counter()
    bar = tqdm(range(step, config.steps), desc="clip", disable=not progress, initial=step, total=config.steps,
               mininterval=10)
    for step in bar:
        rng = np.random.default_rng([config.seed, _BATCH_STREAM, step])
        batch = make_batch(pool, rng, config.batch, config.background_fraction)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, lr=config.lr, min_lr=config.min_lr, warmup=config.warmup_steps,
                                           total=config.steps)
        loss = _batch_loss(model, heads, encoder, batch, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save_state(state_dir, step=step + 1, identity={"config": config.model_dump(mode="json")},
                       model=trainable.state_dict(), optimizer=optimizer, extra={"losses": losses})
            model.eval()
            with torch.no_grad():
                probe_acc = heads.accuracy(model.encode_image(probe.images), probe.image_attrs)
            model.train()
            bar.write(f"step {step + 1}: loss {np.mean(losses[-20:]):.3f}, val probe accuracy "
                      + ", ".join(f"{k} {v:.2f}" for k, v in probe_acc.items()))
    seconds = time.perf_counter() - start
    half = FrozenTextEncoder(model.half(), encoder.tokenizer, name=config.model)
    save_local_dir(half, config.model, out_dir)
    report = _report(out_dir, config, model, seconds, losses, eval_scenes)
    atomic_write_text(out_dir / "train_report.json", report.model_dump_json(indent=2) + "\n")
    shutil.rmtree(state_dir, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--steps", type=int, default=ClipTrainConfig().steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=ClipTrainConfig().batch)
    parser.add_argument("--pool-scenes", type=int, default=ClipTrainConfig().pool_scenes)
    args = parser.parse_args(argv)
    config = ClipTrainConfig(steps=args.steps, seed=args.seed, batch=args.batch, pool_scenes=args.pool_scenes)
    report = train_clip(args.out, config)
    print(report.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    from llavaseg.errors import run_guarded

    raise SystemExit(run_guarded("python -m llavaseg.recipes.train_clip", main))
