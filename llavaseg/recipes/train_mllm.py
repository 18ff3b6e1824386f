"""Train the tiny-world MLLM (a real ``LlavaForConditionalGeneration``) with LLaVA's two-stage recipe, then ship it.

Why two stages: a tiny LLaVA trained naively end to end on shape scenes does not learn to answer reliably
(``docs/tinyworld.md``); LLaVA itself first aligns vision features with the language model and only then
instruction-tunes. Here:

1. **align** - the vision tower and projector learn, through throwaway linear heads on the *projected* image
   tokens, each grid cell's presence, colour, shape, size and cell index (:func:`~llavaseg.recipes.mllm_data.
   cell_targets`). With 96 px inputs and 16 px patches each grid cell is 2x2 image tokens, so this is a
   per-token classification (no language model in the loop).
2. **tune** - the language model, LM head and projector (lower learning rate) learn, the vision tower only at a
   small learning rate, with the aux heads still attached so the tokens stay readable, on conversations rendered
   through the real chat template: the two chain-of-thought turns (``prompts/reason.txt`` then
   ``prompts/attributes.txt``) and multi-turn ordinary dialogue, loss on assistant tokens and their ``</s>`` only.
   **Referent probes** (:class:`ReferentProbes`) add deep supervision: where each answer is decided, the hidden
   states after LM layers 2 and 3 must classify the object the answer is about (the query's target; a dialogue
   question's object).

Why the probes: with next-token loss alone the model learns to describe *an* object of the shape named in
stage 1, not *the* one the query means; supervising the hidden state where the answer is decided makes
resolving the referent a dense target (the ablations are in ``docs/tinyworld.md``, the shipped model's
figures in ``weights/tinyworld/mllm_card.json``).

Data are generated on the fly from the tiny world's *train* split stream (scene ``i`` is seeded by
``(data_seed, "train", i)``), so val/test scenes and their dialogue items stay held out. Every random choice is a
function of ``(seed, stage, step)`` and a checkpoint is written every ``checkpoint_every`` steps: a killed run
resumes exactly where it stopped. The result is saved with ``save_pretrained`` (loads with
``FrozenMLLM.from_pretrained``) and measured on val with greedy generation; numbers go to ``mllm_card.json``.

CLI: ``python -m llavaseg.recipes.train_mllm --out llavaseg/weights/tinyworld/mllm --seed 0``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError, model_validator

from llavaseg.atomic import atomic_write_text
from llavaseg.models.mllm import FrozenMLLM
from llavaseg.paths import TINY_WORLD_WEIGHTS
from llavaseg.prompting import PromptSet
from llavaseg.provenance import machine
from llavaseg.recipes.mllm_data import (
    AUX_CLASSES,
    IGNORE,
    TINY_WORLD_MLLM_SPEC,
    ChatEncoder,
    answer_positions,
    build_tiny_world_mllm,
    cell_targets,
    dialogue_turns,
    evaluate_mllm,
    object_targets,
    pixel_values,
    reason_turns,
)
from llavaseg.recipes.mllm_mining import MinedConfusion, mined_pool
from llavaseg.recipes.mllm_region import evaluate_region, highlighted_object, region_turns, region_view, remap_vocabulary
from llavaseg.tinyworld.generate import iter_scenes, scene_rng
from llavaseg.tinyworld.scenes import Scene, render_scene_array, sample_scene
from llavaseg.train.schedule import lr_factor as schedule_factor
from llavaseg.train.state import load_state, peek_state, save_state

__all__ = ["TrainConfig", "AuxHeads", "train_mllm", "main"]

WEIGHTS_DIR = TINY_WORLD_WEIGHTS
RECIPE = [
    "align: vision tower + projector, per-cell aux heads (discarded), fresh train scenes",
    "tune: LM + LM head (tune_lr), projector (projector_lr), vision tower (vision_lr); per-cell aux heads kept "
    "at aux_weight; referent probes after LM layers referent_layers at referent_weight (discarded); on 2-turn "
    "reason/attributes chats and 5-turn dialogue chats through the llava-1.5 template",
    "region (when region_steps > 0): as tune at region_lr_factor x the learning rates, each scene adding "
    "region_per_scene 3-turn chats on a highlighted view (verify yes/no, colour, shape of the highlighted object); "
    "init_from starts this stage from a saved model, its vocabulary mapped word by word; its scenes are the "
    "train stream's from region_start on",
    "mined confusions (when region_mined_rate > 0): the init_from model answers both stages on mined_scenes fresh "
    "train-stream scenes; each region chat is, at region_mined_rate, a pair on one of its slips: the object it "
    "named highlighted (no) and the query's target (yes)",
]
"""How the shipped weights were made, in words (recorded in the model card)."""
ALIGN_SCENE_OFFSET = 10_000_000
"""Stage 1 draws train-stream scenes from this index on, so the two stages never see the same scene."""


class TrainConfig(BaseModel):
    """Everything that determines the trained weights (recorded in the model card)."""

    seed: int = 0
    data_seed: int = 0
    threads: int = 1
    align_steps: int = 1200
    align_batch: int = 64
    align_pool: int = 12000
    align_lr: float = 3e-3
    tune_steps: int = 3000
    tune_scenes: int = 16
    reason_per_scene: int = 2
    tune_lr: float = 2e-3
    projector_lr: float = 3e-4
    vision_lr: float = 1e-4
    aux_weight: float = 0.2
    referent_weight: float = 1.0
    referent_layers: list[int] = [2, 3]
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    log_every: int = 25
    eval_every: int = 500
    eval_scenes: int = 30
    region_steps: int = 0
    region_per_scene: int = 1
    region_lr_factor: float = 0.5
    region_start: int = 0  # first train-stream scene of the region stage (a continuation can go past seen scenes)
    init_from: str | None = None  # a saved MLLM folder the region stage starts from (align and tune skipped)
    region_mined_rate: float = 0.0  # share of region chats that are a mined confusion pair (mllm_mining)
    mined_scenes: int = 0  # train-stream scenes the init_from model is asked on to mine them
    mined_start: int = 1_000_000  # first such scene (far past the scenes tune/region and the benchmark use)

    @model_validator(mode="after")
    def _mining_needs_a_model(self) -> TrainConfig:
        """Mining asks the ``init_from`` model: a rate without it (or without scenes) would silently mine nothing."""
        if self.region_mined_rate > 0 and (self.init_from is None or self.mined_scenes <= 0):
            raise ValueError("region_mined_rate > 0 needs init_from (the model whose slips are mined) and "
                             "mined_scenes > 0")
        return self


class AuxHeads(torch.nn.Module):
    """Throwaway linear classifiers, one per named :data:`AUX_CLASSES` column of the targets (all by default)."""

    def __init__(self, hidden: int, names: tuple[str, ...] = tuple(AUX_CLASSES)) -> None:
        super().__init__()
        self.columns = [list(AUX_CLASSES).index(name) for name in names]
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(hidden, AUX_CLASSES[name]) for name in names})

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy over heads with labels in this batch, and per-head accuracy (for the log)."""
        losses = []
        accuracy = {}
        flat = tokens.reshape(-1, tokens.shape[-1])
        for column, (name, head) in zip(self.columns, self.heads.items()):
            labels = targets[..., column].reshape(-1)
            keep = labels != IGNORE
            if not keep.any():  # e.g. a batch without reasoning chats: nothing to learn, and no NaN mean
                continue
            logits = head(flat[keep])
            losses.append(F.cross_entropy(logits, labels[keep]))
            accuracy[name] = float((logits.argmax(-1) == labels[keep]).float().mean())
        return (torch.stack(losses).mean() if losses else flat.sum() * 0.0), accuracy


REFERENT_COLUMNS = ("color", "shape", "size", "cell")
"""What a referent probe classifies (``present`` is always true for a referent)."""


class ReferentProbes(torch.nn.Module):
    """Throwaway probes that read the query's referent off the language model's hidden states (deep supervision).

    At the position that opens each stage answer, the hidden state after each layer in ``layers`` (1-based, as
    in ``output_hidden_states``) must classify the referent's colour, shape, size and cell with a linear head.
    Next-token loss alone supervises resolution only through the few answer words, and a 1.4 M-parameter
    model trained on it picked *an* object of the named shape, not *the* one the query means; probing the
    hidden state where the answer is decided makes resolving the referent a dense target. Only training
    uses the probes: the shipped model is a plain ``LlavaForConditionalGeneration``.
    """

    def __init__(self, hidden: int, layers: list[int]) -> None:
        super().__init__()
        self.layers = list(layers)
        self.probes = torch.nn.ModuleList([AuxHeads(hidden, REFERENT_COLUMNS) for _ in self.layers])

    def forward(self, hidden_states: tuple[torch.Tensor, ...], positions: torch.Tensor,
                referent: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean probe loss over layers; ``positions`` ``(B, P)``, ``referent`` ``(B, P, 5)`` (``IGNORE`` skips)."""
        rows = torch.arange(positions.shape[0])[:, None]
        losses, accuracy = [], {}
        for layer, probe in zip(self.layers, self.probes):
            loss, acc = probe(hidden_states[layer][rows, positions], referent)
            losses.append(loss)
            accuracy.update({f"L{layer}_{k}": v for k, v in acc.items()})
        return torch.stack(losses).mean(), accuracy


class ProjectorTap:
    """Keeps the multi-modal projector's latest output: the image tokens the language model reads.

    A forward hook instead of ``output.image_hidden_states``, whose type changes between transformers releases
    (a tensor, then a per-image list, announced to become per-layer states).
    """

    def __init__(self, model: Any) -> None:
        self.tokens: torch.Tensor | None = None
        model.model.multi_modal_projector.register_forward_hook(self._keep)

    def _keep(self, _module: Any, _inputs: Any, output: torch.Tensor) -> None:
        self.tokens = output

    def take(self, batch_size: int) -> torch.Tensor:
        """The captured tokens as ``(B, tokens, text_hidden)``; the tap lets go of them (a tensor inside the
        autograd graph held by a hook would make ``copy.deepcopy(model)`` fail)."""
        tokens, self.tokens = self.tokens, None
        if tokens is None:
            raise RuntimeError("the projector has not run since the last take()")
        return tokens.reshape(batch_size, -1, tokens.shape[-1])


def image_tokens(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Projected image tokens ``(B, tokens, text_hidden)`` as LLaVA computes them (last layer, CLS dropped)."""
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
    return model.model.multi_modal_projector(hidden)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 5 % of the peak."""
    return schedule_factor(step, warmup=warmup, total=total, schedule="cosine", floor=0.05)


# ------------------------------------------------------------------------------------------------ batches


TOKENS_PER_SIDE = TINY_WORLD_MLLM_SPEC.image_size // TINY_WORLD_MLLM_SPEC.patch_size


class AlignPool:
    """A fixed pool of rendered train-stream scenes for stage 1, visited in a seeded shuffled order per epoch.

    Rendering a scene costs about as much as a vision forward/backward on it, so stage 1 reuses scenes for a
    few epochs (``docs/tinyworld.md``: held-out accuracy tracks training accuracy).
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.arrays: list[np.ndarray] = []
        targets = []
        for k in range(config.align_pool):
            scene = sample_scene(scene_rng("train", config.data_seed, ALIGN_SCENE_OFFSET + k))
            self.arrays.append(render_scene_array(scene))
            targets.append(cell_targets(scene, TOKENS_PER_SIDE))
        self.targets = torch.from_numpy(np.stack(targets))
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.config.seed, 1, epoch]).permutation(len(self.arrays))}
        return self._orders[epoch]

    def batch(self, processor: Any, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels and per-token targets of step ``step`` (a pure function of the config and ``step``)."""
        size = len(self.arrays)
        positions = range(step * self.config.align_batch, (step + 1) * self.config.align_batch)
        picks = [int(self._order(k // size)[k % size]) for k in positions]
        return pixel_values(processor, [self.arrays[i] for i in picks]), self.targets[picks]


def _referent(scene: Scene, index: int | None) -> np.ndarray:
    """:func:`object_targets` of object ``index``, or a row of ``IGNORE`` when an answer is about no one object."""
    return np.full(len(AUX_CLASSES), IGNORE, dtype=np.int64) if index is None else object_targets(scene, index)


def tune_batch(processor: Any, encoder: ChatEncoder, prompts: PromptSet, config: TrainConfig,
               step: int, region: bool = False, mined: list[MinedConfusion] | None = None) -> dict[str, torch.Tensor]:
    """Per scene: ``reason_per_scene`` two-turn reasoning chats (distinct queries when the scene has them) and one
    5-turn dialogue chat in random order, right-padded. Several chats per scene halve the cost of generating data.

    For :class:`ReferentProbes`: ``answer_positions`` ``(B, P)`` are the positions opening each answer of a chat,
    and ``referent`` ``(B, P, 5)`` the object that answer is about (:func:`object_targets`): the query's target for
    both reasoning turns, a dialogue question's object where it has one, ``IGNORE`` otherwise and in padding.
    """
    rng = np.random.default_rng([config.seed, 2, step])
    arrays, rows, targets, image_index, referents = [], [], [], [], []
    first = step * config.tune_scenes + (config.region_start if region else 0)
    for scene, image, queries, dialogue in iter_scenes("train", config.data_seed, config.tune_scenes, start=first):
        arrays.append(np.asarray(image))
        targets.append(cell_targets(scene, TOKENS_PER_SIDE))
        picks = rng.permutation(max(len(queries), config.reason_per_scene))[: config.reason_per_scene]
        for pick in picks:
            query = queries[int(pick) % len(queries)]
            rows.append(encoder.encode(reason_turns(prompts, query)))
            referents.append([_referent(scene, query.target_index)] * 2)
        order = rng.permutation(len(dialogue))
        rows.append(encoder.encode(dialogue_turns([dialogue[int(i)] for i in order])))
        referents.append([_referent(scene, dialogue[int(i)].target_index) for i in order])
        image_index += [len(arrays) - 1] * (len(picks) + 1)
        if region:
            _add_region_chats(scene, arrays[-1], queries, prompts, encoder, config, rng,
                              (arrays, rows, targets, image_index, referents), mined)
    width = max(len(ids) for ids, _ in rows)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, (ids, lab) in enumerate(rows):
        input_ids[index, : len(ids)] = torch.tensor(ids)
        labels[index, : len(lab)] = torch.tensor(lab)
        mask[index, : len(ids)] = 1
    index = torch.tensor(image_index)
    pixels = pixel_values(processor, arrays)[index]
    cells = torch.from_numpy(np.stack(targets))[index]
    turns = max(len(r) for r in referents)
    positions = torch.zeros((len(rows), turns), dtype=torch.long)
    referent = torch.full((len(rows), turns, len(AUX_CLASSES)), IGNORE, dtype=torch.long)
    for row, ((_, lab), about_turns) in enumerate(zip(rows, referents)):
        starts = answer_positions(lab)
        positions[row, : len(starts)] = torch.tensor(starts)
        referent[row, : len(about_turns)] = torch.from_numpy(np.stack(about_turns))
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels,
            "cell_targets": cells, "referent": referent, "answer_positions": positions}


def _add_region_chats(scene: Scene, image: np.ndarray, queries: list, prompts: PromptSet, encoder: ChatEncoder,
                      config: TrainConfig, rng: np.random.Generator, into: tuple[list, ...],
                      mined: list[MinedConfusion] | None = None) -> None:
    """Append ``region_per_scene`` highlighted-view chats of one scene to the batch lists (each with its own
    image; no per-cell targets on it; the colour/shape answers are about the highlighted object). With a mined
    pool, each chat is instead, at ``region_mined_rate``, a mined confusion pair: the object a model wrongly
    named for a query ("no") and that query's target ("yes"), on the mined scene."""
    arrays, rows, targets, image_index, referents = into

    def add(on_scene: Scene, on_image: np.ndarray, query: Any, index: int) -> None:
        arrays.append(region_view(on_image, on_scene, index))
        targets.append(np.full((TOKENS_PER_SIDE * TOKENS_PER_SIDE, len(AUX_CLASSES)), IGNORE, dtype=np.int64))
        rows.append(encoder.encode(region_turns(prompts, on_scene, query, index)))
        referents.append([_referent(on_scene, None), _referent(on_scene, index), _referent(on_scene, index)])
        image_index.append(len(arrays) - 1)

    for _ in range(config.region_per_scene):
        if mined and rng.random() < config.region_mined_rate:
            confusion = mined[int(rng.integers(len(mined)))]
            mined_scene, mined_image, mined_queries, _ = next(iter_scenes("train", config.data_seed, 1,
                                                                          start=confusion.scene))
            query, array = mined_queries[confusion.query], np.asarray(mined_image)
            add(mined_scene, array, query, confusion.wrong)
            add(mined_scene, array, query, query.target_index)
            continue
        query = queries[int(rng.integers(len(queries)))]
        add(scene, image, query, highlighted_object(scene, query, rng))


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Next-token cross-entropy on assistant tokens only, and their teacher-forced token accuracy."""
    pred, gold = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    keep = gold != IGNORE
    loss = F.cross_entropy(pred, gold, ignore_index=IGNORE)
    return loss, float((pred.argmax(-1)[keep] == gold[keep]).float().mean())


def _optimizer(model: Any, heads: torch.nn.ModuleDict, config: TrainConfig, stage: str) -> torch.optim.AdamW:
    """Stage ``align``: vision tower + projector + cell heads. Stage ``tune``: language model + projector + cell
    heads + referent probes (+ vision tower at ``vision_lr`` unless it is 0)."""
    inner = model.model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if stage == "align":
        groups = [{"params": [*inner.vision_tower.parameters(), *inner.multi_modal_projector.parameters(),
                              *heads["cells"].parameters()], "lr": config.align_lr}]
    else:
        scale = config.region_lr_factor if stage == "region" else 1.0
        groups = [
            {"params": [*inner.language_model.parameters(), *model.lm_head.parameters(), *heads.parameters()],
             "lr": config.tune_lr * scale},
            {"params": list(inner.multi_modal_projector.parameters()), "lr": config.projector_lr * scale},
        ]
        if config.vision_lr > 0:  # LLaVA freezes the vision tower here; a small lr lets the aux heads keep polishing
            groups.append({"params": list(inner.vision_tower.parameters()), "lr": config.vision_lr * scale})
    for group in groups:
        for parameter in group["params"]:
            parameter.requires_grad_(True)
        group["base_lr"] = group["lr"]
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay, betas=(0.9, 0.98))


def weights_digest(model: torch.nn.Module) -> str:
    """Hash of every parameter's bytes: equal digests mean bit-identical weights (determinism checks)."""
    digest = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ training


def _optimiser_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()


def _advance(record: dict[str, Any], stage: str, step: int, start: float, cpu_start: float) -> None:
    """Count a finished step and its wall/CPU time in the run record (checkpointed, so resumes keep totals)."""
    record["step"] = step + 1
    record["seconds"][stage] += time.perf_counter() - start
    record["cpu_seconds"][stage] += time.process_time() - cpu_start


def _quick_eval(model: Any, processor: Any, prompts: PromptSet, config: TrainConfig) -> dict[str, Any]:
    mllm = FrozenMLLM(copy.deepcopy(model).eval(), processor)
    report = evaluate_mllm(mllm, prompts, "val", config.data_seed, count=config.eval_scenes)
    return {k: report[k] for k in ("stage1_exact_match", "attribute_accuracy", "attribute_full_set_accuracy",
                                   "dialogue_exact_match")}


class _Trainer:
    """Both stages of one run, with the state a checkpoint saves (model, heads, optimiser, record)."""

    def __init__(self, config: TrainConfig, work_dir: Path, log: Any, stop_after: int | None) -> None:
        self.config, self.work_dir, self.log = config, work_dir, log
        self.prompts = PromptSet.load()
        self.model, self.processor = build_tiny_world_mllm(self.prompts, seed=config.seed)
        torch.manual_seed(config.seed + 1)
        hidden = TINY_WORLD_MLLM_SPEC.text_hidden
        self.heads = torch.nn.ModuleDict({"cells": AuxHeads(hidden),
                                          "referent": ReferentProbes(hidden, config.referent_layers)})
        self.tap = ProjectorTap(self.model)
        self.encoder = ChatEncoder(self.processor, TINY_WORLD_MLLM_SPEC.num_image_tokens)
        self.record: dict[str, Any] = {"stage": "align", "step": 0,
                                       "seconds": {"align": 0.0, "tune": 0.0, "region": 0.0},
                                       "cpu_seconds": {"align": 0.0, "tune": 0.0, "region": 0.0}, "history": []}
        self.budget = stop_after if stop_after is not None else -1
        self.mined: list[MinedConfusion] | None = None
        if config.init_from is not None:
            self._start_from(Path(config.init_from))
        self.optimizer = _optimizer(self.model, self.heads, config, self.record["stage"])

    def _start_from(self, folder: Path) -> None:
        """Begin at the region stage from a saved model (its words mapped onto this vocabulary)."""
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        old = LlavaForConditionalGeneration.from_pretrained(folder)
        old_processor = AutoProcessor.from_pretrained(folder)
        remap_vocabulary(old, old_processor.tokenizer, self.model, self.processor.tokenizer)
        digest = weights_digest(old)
        self.record["stage"] = "region"
        self.record["init_from"] = {"folder": str(folder), "weights_digest": digest}
        if self.config.region_mined_rate > 0:  # the loaded model, frozen, is the one whose slips are mined
            self.mined = mined_pool(self.work_dir, FrozenMLLM(old, old_processor, name=str(folder)), digest,
                                    self.prompts, self.config.data_seed, self.config.mined_start,
                                    self.config.mined_scenes, self.log)
            self.record["mined_confusions"] = len(self.mined)

    @property
    def identity(self) -> dict[str, Any]:
        return {"config": self.config.model_dump()}

    def resume(self) -> None:
        peeked = peek_state(self.work_dir)
        if peeked is None:
            return
        stage = peeked.extra["record"]["stage"]
        self.optimizer = _optimizer(self.model, self.heads, self.config, stage)
        resumed = load_state(self.work_dir, identity=self.identity, optimizer=self.optimizer)
        assert resumed is not None
        self.model.load_state_dict({k[len("llava/"):]: v for k, v in resumed.model.items() if k.startswith("llava/")})
        self.heads.load_state_dict({k[len("heads/"):]: v for k, v in resumed.model.items() if k.startswith("heads/")})
        self.record = resumed.extra["record"]
        self.log(f"resumed from {self.work_dir}: stage {stage} step {self.record['step']}")

    def checkpoint(self) -> None:
        tensors = {**{f"llava/{k}": v for k, v in self.model.state_dict().items()},
                   **{f"heads/{k}": v for k, v in self.heads.state_dict().items()}}
        save_state(self.work_dir, step=self.record["step"], identity=self.identity, model=tensors,
                   optimizer=self.optimizer, extra={"record": self.record})

    def out_of_budget(self) -> bool:
        """Counts one step of a ``stop_after`` budget; at zero, checkpoints and says stop."""
        self.budget -= 1
        if self.budget == 0:
            self.checkpoint()
            return True
        return False

    def _after_step(self, stage: str, total: int, entry: dict[str, Any]) -> bool:
        """Log, checkpoint and budget bookkeeping after one step; True means stop this call."""
        step = self.record["step"]
        if step % self.config.log_every == 0 or step == total:
            if stage != "align" and self.config.eval_every and step % self.config.eval_every == 0:
                entry["val"] = _quick_eval(self.model, self.processor, self.prompts, self.config)
            self.record["history"].append(entry)
            self.log(json.dumps(entry))
        if step % self.config.checkpoint_every == 0:
            self.checkpoint()
        return self.out_of_budget()

    def align(self) -> bool:
        """Stage 1: vision tower + projector learn per-cell attributes. Returns False if stopped early."""
        config, record = self.config, self.record
        start, cpu_start = time.perf_counter(), time.process_time()
        pool = AlignPool(config)
        record["seconds"]["align"] += time.perf_counter() - start
        record["cpu_seconds"]["align"] += time.process_time() - cpu_start
        self.log(f"align pool of {config.align_pool} scenes rendered in {time.perf_counter() - start:.1f} s")
        while record["step"] < config.align_steps:
            step = record["step"]
            start, cpu_start = time.perf_counter(), time.process_time()
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, config.align_steps, config.warmup // 2)
            pixels, targets = pool.batch(self.processor, step)
            loss, accuracy = self.heads["cells"](image_tokens(self.model, pixels), targets)
            _optimiser_step(self.optimizer, loss, config.grad_clip)
            _advance(record, "align", step, start, cpu_start)
            entry = {"stage": "align", "step": record["step"], "loss": round(loss.item(), 4),
                     **{k: round(v, 4) for k, v in accuracy.items()}, "seconds": round(record["seconds"]["align"], 1)}
            if self._after_step("align", config.align_steps, entry):
                return False
        record["stage"], record["step"] = "tune", 0
        self.optimizer = _optimizer(self.model, self.heads, config, "tune")
        self.checkpoint()
        return True

    def _tune_loss(self, step: int, region: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        config = self.config
        batch = tune_batch(self.processor, self.encoder, self.prompts, config, step, region=region,
                           mined=self.mined if region else None)
        output = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"], use_cache=False,
                            output_hidden_states=config.referent_weight > 0)
        loss, token_accuracy = answer_loss(output.logits, batch["labels"])
        aux_loss, _ = self.heads["cells"](self.tap.take(batch["input_ids"].shape[0]), batch["cell_targets"])
        total = loss + config.aux_weight * aux_loss
        referent_loss, referent_accuracy = torch.zeros(()), {}
        if config.referent_weight > 0:
            referent_loss, referent_accuracy = self.heads["referent"](
                output.hidden_states, batch["answer_positions"], batch["referent"])
            total = total + config.referent_weight * referent_loss
        entry = {"stage": "tune", "loss": round(loss.item(), 4), "token_acc": round(token_accuracy, 4),
                 "aux_loss": round(aux_loss.item(), 4), "referent_loss": round(referent_loss.item(), 4),
                 **{k: round(v, 4) for k, v in referent_accuracy.items()}}
        return total, entry

    def tune(self) -> bool:
        """Stage 2: the language model learns the stage turns and dialogue. Returns False if stopped early."""
        if not self._language_stage("tune", self.config.tune_steps):
            return False
        if self.config.region_steps > 0:
            self.record["stage"], self.record["step"] = "region", 0
            self.optimizer = _optimizer(self.model, self.heads, self.config, "region")
        else:
            self.record["stage"] = "done"
        self.checkpoint()
        return True

    def region(self) -> bool:
        """Stage 3: tune's mix plus highlighted-view chats (see :mod:`llavaseg.recipes.mllm_region`)."""
        if not self._language_stage("region", self.config.region_steps):
            return False
        self.record["stage"] = "done"
        self.checkpoint()
        return True

    def _language_stage(self, stage: str, total: int) -> bool:
        config, record = self.config, self.record
        while record["step"] < total:
            step = record["step"]
            start, cpu_start = time.perf_counter(), time.process_time()
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, total, config.warmup)
            loss, entry = self._tune_loss(step, region=stage == "region")
            _optimiser_step(self.optimizer, loss, config.grad_clip)
            _advance(record, stage, step, start, cpu_start)
            entry = {"stage": stage, "step": record["step"], **{k: v for k, v in entry.items() if k != "stage"},
                     "seconds": round(record["seconds"][stage], 1)}
            if self._after_step(stage, total, entry):
                return False
        return True


def train_mllm(config: TrainConfig, work_dir: Path, log: Any = print,
               stop_after: int | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Run (or resume) both stages; returns the trained model, its processor and the training record.

    ``stop_after`` ends this call after that many optimiser steps, checkpointing first, as if the run had
    been killed (used to check that resuming gives bit-identical weights).
    """
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    work_dir.mkdir(parents=True, exist_ok=True)
    trainer = _Trainer(config, work_dir, log, stop_after)
    trainer.resume()
    trainer.model.train()
    if trainer.record["stage"] == "align" and not trainer.align():
        return trainer.model.eval(), trainer.processor, trainer.record
    if trainer.record["stage"] == "tune" and not trainer.tune():
        return trainer.model.eval(), trainer.processor, trainer.record
    if trainer.record["stage"] == "region":
        trainer.region()
    return trainer.model.eval(), trainer.processor, trainer.record


def save_model(model: Any, processor: Any, out: Path) -> None:
    """``save_pretrained`` model (safetensors) and processor (tokenizer, image processor, chat template)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _config_from(args: argparse.Namespace) -> TrainConfig:
    """The run's config from the flags; an invalid combination is one line, not a pydantic traceback."""
    try:
        return TrainConfig(**{name: getattr(args, name) for name in TrainConfig.model_fields})
    except ValidationError as exc:
        from llavaseg.errors import InputError

        raise InputError(f"invalid setting: {exc.errors()[0]['msg']}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR / "mllm", help="save_pretrained directory")
    parser.add_argument("--card", type=Path, default=None, help="model card JSON (default: <out>_card.json)")
    parser.add_argument("--work-dir", type=Path, default=None, help="checkpoints (default: runs/mllm-seed<seed>)")
    parser.add_argument("--val-scenes", type=int, default=None, help="val scenes to measure (default: whole split)")
    parser.add_argument("--eval-only", action="store_true", help="only measure an existing --out directory")
    for name, field in TrainConfig.model_fields.items():
        if isinstance(field.default, bool):
            parser.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction,
                                default=field.default)
        elif isinstance(field.default, list):
            parser.add_argument(f"--{name.replace('_', '-')}", type=int, nargs="*", default=field.default)
        else:
            kind = str if field.default is None else type(field.default)
            parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=field.default)
    args = parser.parse_args(argv)
    config = _config_from(args)
    card_path = args.card or args.out.parent / f"{args.out.name}_card.json"
    work_dir = args.work_dir or Path("runs") / f"mllm-seed{config.seed}"
    torch.set_num_threads(config.threads)

    record: dict[str, Any] | None = None
    if not args.eval_only:
        model, processor, record = train_mllm(config, work_dir)
        save_model(model, processor, args.out)
        print(f"saved {args.out} (weights digest {weights_digest(model)})")
    mllm = FrozenMLLM.from_pretrained(args.out, local_files_only=True)
    report = evaluate_mllm(mllm, PromptSet.load(), "val", config.data_seed, count=args.val_scenes)
    report.update(evaluate_region(mllm, PromptSet.load(), "val", config.data_seed, count=args.val_scenes))
    print(json.dumps({k: v for k, v in report.items() if k != "errors"}, indent=1))
    if record is None:
        return 0
    params = sum(p.numel() for p in mllm.model.parameters())
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    card = {
        "model": "tiny-world LLaVA (LlavaForConditionalGeneration, CLIP vision + Llama text)",
        "spec": TINY_WORLD_MLLM_SPEC.model_dump(),
        "parameters": params,
        "directory_bytes": size,
        "weights_digest": weights_digest(mllm.model),
        "config": config.model_dump(),
        "recipe": RECIPE,
        "init_from": record.get("init_from"),
        "wall_seconds": {k: round(v, 1) for k, v in record["seconds"].items()},
        "wall_seconds_total": round(sum(record["seconds"].values()), 1),
        "cpu_seconds": {k: round(v, 1) for k, v in record["cpu_seconds"].items()},
        "note_on_time": "wall time on a 2-core machine shared with other training jobs; cpu_seconds is this "
                        f"process's CPU time summed over its {config.threads} thread(s)",
        "threads": config.threads,
        "machine": {"cpu_count": os.cpu_count(), **machine(), "threads": config.threads},
        "val": report,
        "history": record["history"],
    }
    atomic_write_text(card_path, json.dumps(card, indent=1) + "\n")
    print(f"wrote {card_path}")
    return 0


if __name__ == "__main__":
    from llavaseg.errors import run_guarded

    raise SystemExit(run_guarded("python -m llavaseg.recipes.train_mllm", main))
