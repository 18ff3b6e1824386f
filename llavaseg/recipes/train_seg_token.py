"""Train the tiny-world ``[SEG]`` model (the LISA-style rival route) and ship it with a card.

Why: the route comparison needs a LISA-style model trained on the *same* frozen tiny-world MLLM and SAM the
LLaVASeg route uses. This starts from the shipped tiny-world MLLM and SAM, fine-tunes copies of them the LISA
way (:mod:`llavaseg.seg_token`: LoRA r=8 on the LLM's q/v, full embeddings and LM head, SAM's mask decoder and
the projection; loss CE 1.0 + BCE 2.0 + Dice 0.5) on tiny-world train (every text of every scene, ReasonSeg
JSON + polygon masks), optionally mixed with tiny-world train dialogue as LISA mixes in VQA data
(``vqa_rate``; LISA's sampling rates 9:3:3:1 give VQA 3/16), and evaluates on tiny-world val with both LISA
protocols (generated ``[SEG]`` and teacher-forced, first text per image as LISA) plus dialogue agreement with the
base MLLM.

Everything random is seeded from ``(seed, step)``, and the model + optimiser are checkpointed every
``checkpoint_every`` steps into ``--work`` (:mod:`llavaseg.train.state`), so an interrupted run resumes exactly.
Only what training changed is shipped (``seg_token.safetensors``: LoRA, embeddings, LM head, projection,
decoder) plus ``seg_token.json`` and ``card.json``.

CLI: ``python -m llavaseg.recipes.train_seg_token --out llavaseg/weights/tinyworld/seg_token --steps N``
(``--preset tiny`` for a plumbing run on random models).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field
from tqdm import tqdm

from llavaseg.atomic import atomic_write_text
from llavaseg.data.annotations import DIALOGUE_FILE, STAGES_FILE, DialogueRecord, GroundTruthStages, read_records
from llavaseg.data.reasonseg import ReasonSegDataset
from llavaseg.errors import InputError
from llavaseg.evaluate import MetricAccumulator
from llavaseg.images import load_image
from llavaseg.models.mllm import FrozenMLLM
from llavaseg.models.components import build_mllm, build_sam
from llavaseg.models.presets import get_preset
from llavaseg.models.sam import FrozenSAM, SamImageFeatures
from llavaseg.paths import TINY_WORLD_WEIGHTS, cache_dir
from llavaseg.provenance import machine
from llavaseg.recipes.mllm_data import format_attributes
from llavaseg.seg_token.checkpoint import (
    assign_trained_state,
    save_seg_token_model,
    trained_state,
)
from llavaseg.seg_token.inference import predict
from llavaseg.seg_token.model import SegTokenModel, create_seg_token_model
from llavaseg.seg_token.prompts import AnswerStyle
from llavaseg.seg_token.train import (
    ClipMode,
    SegSample,
    make_batch,
    make_optimizer,
    seg_token_train_step,
    warmup_decay,
)
from llavaseg.train.state import load_state, save_state

WEIGHTS_DIR = TINY_WORLD_WEIGHTS / "seg_token"


class SegTokenTrainConfig(BaseModel):
    """Everything that determines the trained weights (recorded in the card). The defaults are LISA's recipe
    verbatim; ``templates``, ``clip`` and ``refer_rate`` are the toy's fixes, ``answer_style`` the CoT extension
    (see the module docstring)."""

    preset: str = "tiny-world"
    steps: int = 1500
    seed: int = 0
    data_seed: int = 0
    batch_size: int = 8
    lr: float = 3e-4
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    vqa_rate: float = 0.1875
    checkpoint_every: int = 100
    eval_limit: int | None = None
    max_new_tokens: int = 16
    templates: str = "lisa"
    answer_style: AnswerStyle = "lisa"
    clip: ClipMode = "global"
    refer_rate: float = Field(0.0, ge=0.0, le=1.0)


class SplitScores(BaseModel):
    giou: float | None
    ciou: float | None
    short_giou: float | None
    long_giou: float | None
    n_queries: int
    mean_seg_count: float
    no_seg_rate: float


class DialogueScores(BaseModel):
    n_questions: int
    agreement_with_base: float
    base_accuracy: float
    seg_token_accuracy: float


class SegTokenTrainReport(BaseModel):
    """What a finished run measured; written as ``card.json`` next to the weights."""

    config: SegTokenTrainConfig
    steps_done: int
    train_seconds: float
    threads: int
    final_loss: float | None
    loss_curve: list[tuple[int, float]]
    n_train_queries: int
    n_train_dialogue: int
    val_generate: SplitScores | None = None
    val_teacher_forced: SplitScores | None = None
    val_dialogue: DialogueScores | None = None
    weights_bytes: int = 0
    torch_version: str = Field(default_factory=lambda: torch.__version__)
    machine: dict = Field(default_factory=machine)
    protocol_note: str = ("val = tiny-world val, first text per image (LISA ValDataset); 'generate' = greedy "
                          "generation, mask from generated [SEG] (union), empty mask if none; 'teacher_forced' = "
                          "LISA validate(): assistant turn pre-filled with '[SEG].'")


# -------------------------------------------------------------------------------------------------- data
@dataclass
class TrainData:
    segmentation: list[SegSample]
    segmentation_features: list[SamImageFeatures]
    dialogue: list[SegSample]
    dialogue_features: list[SamImageFeatures]
    referring: list[SegSample] = field(default_factory=list)  # explicit-attribute queries, one per text


def _light(features: SamImageFeatures) -> SamImageFeatures:
    """Keep the decoder's input only (the multi-scale levels are the LLaVASeg adapters', not needed here)."""
    return SamImageFeatures(features.embedding, [], features.input_size, features.original_size)


def _encode_all(sam: FrozenSAM, images: list[np.ndarray], chunk: int = 16) -> list[SamImageFeatures]:
    features: list[SamImageFeatures] = []
    for start in tqdm(range(0, len(images), chunk), desc="SAM features", leave=False):
        features += [_light(f) for f in sam.encode_batch(images[start: start + chunk])]
    return features


def explicit_query(attributes: dict[str, str]) -> str:
    """A referring-segmentation query spelling the target out (``the large yellow triangle in the right``), in
    the tiny world's words: the easy share LISA's mix has (class names, RefCOCO) and the tiny world lacks."""
    return f"the {attributes['size']} {attributes['color']} {attributes['shape']} in the {attributes['location']}"


def load_train_data(root: Path, sam: FrozenSAM, split: str = "train") -> TrainData:
    """Every text of every scene (with its mask, ground-truth attributes and an explicit twin query) and every
    dialogue pair of ``split``, SAM-encoded once."""
    dataset = ReasonSegDataset(root, split)
    stages = GroundTruthStages.for_dataset(dataset) if (dataset.split_dir / STAGES_FILE).is_file() else None
    images: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    seg: list[SegSample] = []
    referring: list[SegSample] = []
    keys: list[str] = []
    for query in dataset.queries():
        if query.sample_id not in images:
            images[query.sample_id] = query.load_image()
            masks[query.sample_id] = query.load_mask()
        attributes = stages.lookup(query).attributes if stages is not None else None
        sentence = f"{format_attributes(attributes)} ." if attributes else None
        seg.append(SegSample(images[query.sample_id], query.text, query.is_sentence, masks[query.sample_id],
                             attributes=sentence))
        if attributes:
            referring.append(SegSample(images[query.sample_id], explicit_query(attributes), False,
                                       masks[query.sample_id], attributes=sentence))
        keys.append(query.sample_id)
    order = list(images)
    encoded = dict(zip(order, _encode_all(sam, [images[k] for k in order])))
    dialogue, dialogue_keys = [], []
    for record in _dialogue_records(root, split):
        name = f"{split}/{record.image}"  # ReasonSeg sample ids are "<split>/<name>"
        if name not in images:
            continue
        dialogue.append(SegSample(images[name], record.question, answer=record.answer))
        dialogue_keys.append(name)
    return TrainData(seg, [encoded[k] for k in keys], dialogue, [encoded[k] for k in dialogue_keys], referring)


def _dialogue_records(root: Path, split: str) -> list[DialogueRecord]:
    path = root / split / DIALOGUE_FILE
    return read_records(path, DialogueRecord) if path.is_file() else []


def step_samples(data: TrainData, config: SegTokenTrainConfig, rng: random.Random
                 ) -> tuple[list[SegSample], list[SamImageFeatures]]:
    """One batch: each slot is a dialogue pair with probability ``vqa_rate``, else a segmentation query (its
    explicit twin with probability ``refer_rate``). The extra draw happens only when ``refer_rate > 0``, so
    LISA's recipe (``refer_rate=0``) draws exactly as before."""
    samples, features = [], []
    for _ in range(config.batch_size):
        if data.dialogue and rng.random() < config.vqa_rate:
            index = rng.randrange(len(data.dialogue))
            samples.append(data.dialogue[index])
            features.append(data.dialogue_features[index])
        else:
            index = rng.randrange(len(data.segmentation))
            explicit = config.refer_rate > 0 and rng.random() < config.refer_rate
            samples.append((data.referring if explicit else data.segmentation)[index])
            features.append(data.segmentation_features[index])
    return samples, features


# ------------------------------------------------------------------------------------------- evaluation
def evaluate_split(model: SegTokenModel, root: Path, split: str, protocol: str, *, limit: int | None = None,
                   batch_size: int = 8, max_new_tokens: int = 16) -> SplitScores:
    """gIoU/cIoU (LISA's definitions) on the first text of each image of ``split``."""
    queries = list(ReasonSegDataset(root, split, first_text_only=True).queries())[:limit]
    accumulator = MetricAccumulator()
    counts: list[int] = []
    for start in tqdm(range(0, len(queries), batch_size), desc=f"eval {split} {protocol}", leave=False):
        chunk = queries[start: start + batch_size]
        images = [q.load_image() for q in chunk]
        predictions = predict(model, images, [q.text for q in chunk], protocol=protocol,  # type: ignore[arg-type]
                              style=["long" if q.is_sentence else "short" for q in chunk],
                              max_new_tokens=max_new_tokens)
        for query, prediction in zip(chunk, predictions):
            accumulator.add_masks(prediction.union, query.load_mask(), query_id=query.query_id,
                                  is_sentence=query.is_sentence)
            counts.append(prediction.masks.shape[0])
    result = accumulator.result()
    return SplitScores(giou=result["overall"].giou, ciou=result["overall"].ciou, short_giou=result["short"].giou,
                       long_giou=result["long"].giou, n_queries=len(queries),
                       mean_seg_count=float(np.mean(counts)) if counts else 0.0,
                       no_seg_rate=float(np.mean([c == 0 for c in counts])) if counts else 0.0)


def dialogue_scores(base: FrozenMLLM, tuned: FrozenMLLM, root: Path, split: str, *, limit: int | None = None,
                    batch_size: int = 16) -> DialogueScores:
    """Exact-match agreement of the tuned model's chat answers with the base MLLM's on ``dialogue.jsonl``."""
    records = _dialogue_records(root, split)[:limit]
    if not records:
        raise InputError(f"no {DIALOGUE_FILE} in {root / split}")
    agree = base_ok = tuned_ok = 0
    for start in tqdm(range(0, len(records), batch_size), desc="dialogue", leave=False):
        chunk = records[start: start + batch_size]
        images = [load_image(root / split / f"{r.image}.png") for r in chunk]
        questions = [r.question for r in chunk]
        for record, a, b in zip(chunk, base.answer(images, questions), tuned.answer(images, questions)):
            agree += a.strip() == b.strip()
            base_ok += a.strip() == record.answer.strip()
            tuned_ok += b.strip() == record.answer.strip()
    n = len(records)
    return DialogueScores(n_questions=n, agreement_with_base=agree / n, base_accuracy=base_ok / n,
                          seg_token_accuracy=tuned_ok / n)


# ---------------------------------------------------------------------------------------------- training
def build_base(preset_name: str) -> tuple[FrozenMLLM, FrozenSAM]:
    """The preset's frozen MLLM and SAM (the text encoder and adapters are not needed here)."""
    preset = get_preset(preset_name)
    mllm = build_mllm(preset.mllm, device="cpu", dtype=None, quantization=None)
    sam = build_sam(preset.sam, device="cpu")
    return mllm, sam


def train(config: SegTokenTrainConfig, out: Path, work: Path, root: Path, *, max_minutes: float | None = None,
          threads: int = 1) -> SegTokenTrainReport:
    """Train (resuming from ``work`` if it holds a checkpoint of the same config), evaluate, ship to ``out``."""
    torch.set_num_threads(threads)
    mllm, sam = build_base(config.preset)
    work.mkdir(parents=True, exist_ok=True)
    data = load_train_data(root, sam, "train")
    model = create_seg_token_model(mllm, sam, seed=config.seed, templates=config.templates,
                                   answer_style=config.answer_style)
    optimizer = make_optimizer(model, lr=config.lr)
    scheduler = warmup_decay(optimizer, config.warmup_steps, config.steps)
    identity = {"config": config.model_dump(mode="json")}
    start, elapsed, curve = 0, 0.0, []
    resumed = load_state(work, identity=identity, optimizer=optimizer, scheduler=scheduler)
    if resumed is not None:
        assign_trained_state(model, resumed.model)
        model.config.trained_steps = resumed.step
        start, elapsed, curve = resumed.step, resumed.extra["elapsed"], [tuple(p) for p in resumed.extra["curve"]]
    began = time.perf_counter() - elapsed
    window: list[float] = []
    progress = tqdm(range(start, config.steps), desc="seg-token", initial=start, total=config.steps)
    step = start
    for step in progress:
        rng = random.Random(config.seed * 1_000_003 + step)
        torch.manual_seed(config.seed * 1_000_003 + step)
        samples, features = step_samples(data, config, rng)
        batch = make_batch(model, samples, rng, features)
        loss = seg_token_train_step(model, batch, optimizer, scheduler=scheduler, max_grad_norm=config.max_grad_norm,
                                    clip=config.clip)
        window.append(loss)
        if (step + 1) % 25 == 0:
            curve.append((step + 1, float(np.mean(window))))
            progress.set_postfix(loss=f"{np.mean(window):.3f}")
            window = []
        done = step + 1
        out_of_time = max_minutes is not None and time.perf_counter() - began > max_minutes * 60
        if done % config.checkpoint_every == 0 or done == config.steps or out_of_time:
            save_state(work, step=done, identity=identity, model=trained_state(model), optimizer=optimizer,
                       scheduler=scheduler, extra={"elapsed": time.perf_counter() - began, "curve": curve})
        if out_of_time:
            step = done
            break
    else:
        step = config.steps
    seconds = time.perf_counter() - began
    report = SegTokenTrainReport(config=config, steps_done=step, train_seconds=round(seconds, 1), threads=threads,
                                 final_loss=curve[-1][1] if curve else None, loss_curve=curve,
                                 n_train_queries=len(data.segmentation), n_train_dialogue=len(data.dialogue))
    report = evaluate_into(report, model, mllm, root, config)
    out.mkdir(parents=True, exist_ok=True)
    save_seg_token_model(model, out)
    report.weights_bytes = sum(p.stat().st_size for p in out.glob("seg_token.*"))
    atomic_write_text(out / "card.json", report.model_dump_json(indent=2) + "\n")
    return report


def evaluate_into(report: SegTokenTrainReport, model: SegTokenModel, mllm: FrozenMLLM, root: Path,
                  config: SegTokenTrainConfig) -> SegTokenTrainReport:
    """Fill the card's val scores (both protocols, dialogue agreement)."""
    report.val_generate = evaluate_split(model, root, "val", "generate", limit=config.eval_limit,
                                         max_new_tokens=config.max_new_tokens)
    if config.answer_style == "lisa":  # teacher forcing pre-fills LISA's answer: not defined for attributes-first
        report.val_teacher_forced = evaluate_split(model, root, "val", "teacher-forced", limit=config.eval_limit)
    report.val_dialogue = dialogue_scores(mllm, model.dialogue_model(), root, "val", limit=config.eval_limit)
    return report


def main(argv: list[str] | None = None) -> int:
    from llavaseg.tinyworld.generate import default_tinyworld_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--work", type=Path, default=None, help="resume directory (default: ~/.cache/llavaseg/...)")
    parser.add_argument("--data", type=Path, default=None, help="tiny-world root (default: generated cache)")
    parser.add_argument("--preset", default="tiny-world")
    parser.add_argument("--steps", type=int, default=SegTokenTrainConfig().steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=SegTokenTrainConfig().batch_size)
    parser.add_argument("--lr", type=float, default=SegTokenTrainConfig().lr)
    parser.add_argument("--vqa-rate", type=float, default=SegTokenTrainConfig().vqa_rate)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--templates", default="lisa", help="lisa (verbatim) or tiny-world (LISA's texts in the "
                                                           "tiny world's words)")
    parser.add_argument("--answer-style", default="lisa", choices=["lisa", "attributes-first"],
                        help="attributes-first: write the target's attributes, then [SEG] (seg-token-cot)")
    parser.add_argument("--clip", default="global", choices=["global", "per-group"],
                        help="gradient clipping: LISA's global norm, or language and mask path each")
    parser.add_argument("--refer-rate", type=float, default=0.0,
                        help="share of segmentation slots given the explicit-attribute twin query")
    parser.add_argument("--max-new-tokens", type=int, default=SegTokenTrainConfig().max_new_tokens)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and checkpoint) after this long")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    config = SegTokenTrainConfig(preset=args.preset, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                                 lr=args.lr, vqa_rate=args.vqa_rate, eval_limit=args.eval_limit,
                                 templates=args.templates, answer_style=args.answer_style, clip=args.clip,
                                 refer_rate=args.refer_rate, max_new_tokens=args.max_new_tokens)
    root = args.data or default_tinyworld_root()
    digest = hashlib.blake2b(config.model_dump_json().encode(), digest_size=4).hexdigest()
    work = args.work or cache_dir(f"train_seg_token-{args.preset}-{args.seed}-{digest}")  # one folder per config
    report = train(config, args.out, work, root, max_minutes=args.max_minutes, threads=args.threads)
    print(report.model_dump_json(indent=2, exclude={"loss_curve"}))
    return 0


if __name__ == "__main__":
    from llavaseg.errors import run_guarded

    raise SystemExit(run_guarded("python -m llavaseg.recipes.train_seg_token", main))
